"""What the two CLIs print: one output format, one error shape, one exit-code table.

Formats (`--output`): `json` (indented, the whole answer), `table` (columns for a list of
objects, KEY VALUE rows for one object; nested values as compact JSON) and `tsv` (the
table's rows without a header, tab-separated, for `cut` and `while read`). The default is
`table` when stdout is a terminal and `json` otherwise, so a person gets something to read
and a script gets something to parse without asking for it. `--query` is a JMESPath
expression applied first (as the Azure CLI does), so `-o tsv --query '[].name'` gives one
name a line.

Timestamps are printed in RFC 3339 (UTC, "2026-12-06T07:55:00Z"): the APIs speak Key
Vault's epoch seconds, which no person reads; each CLI names the fields that hold them.

Errors: the first line on stderr is `error: MESSAGE [CODE, HTTP STATUS]`; with `--output
json` a second line follows, `{"error": {"code", "message", "status"}}`, for scripts. The
exit status says what the caller can do about it (docs/operations.md, "Exit codes").
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .rfc3339 import format_time

FORMATS = ("json", "table", "tsv")

# Exit codes, the same for both CLIs.
EXIT_OK = 0
EXIT_REFUSED = 1  # the service answered no (4xx), an operation failed, or a check found a fault
EXIT_USAGE = 2  # the command line, a setting or a local file is wrong: nothing was sent
EXIT_UNAVAILABLE = 3  # unreachable, too slow, or the service failed (5xx): a retry may work
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it); what the server runs goes on


class CliError(Exception):
    """A failure to report at the CLI's edge: its message, code, HTTP status and exit code."""

    def __init__(self, message: str, *, code: str = "Error", status: int | None = None,
                 exit_code: int = EXIT_REFUSED):
        super().__init__(message)
        self.message, self.code, self.status, self.exit_code = message, code, status, exit_code

    def line(self) -> str:
        where = ", ".join(x for x in (self.code, f"HTTP {self.status}" if self.status else "") if x)
        return f"error: {self.message}" + (f" [{where}]" if where else "")

    def as_json(self) -> str:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.status:
            err["status"] = self.status
        return json.dumps({"error": err})


def default_format(stream: TextIO | None = None) -> str:
    stream = stream or sys.stdout
    try:
        return "table" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def report_error(err: CliError, fmt: str | None, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    stream.write(err.line() + "\n")
    if (fmt or default_format()) == "json":
        stream.write(err.as_json() + "\n")
    stream.flush()


# --------------------------------------------------------------------------- timestamps
def with_rfc3339(obj: Any, keys: frozenset[str]) -> Any:
    """A copy of `obj` with every number under one of `keys` (at any depth) as RFC 3339."""
    if isinstance(obj, dict):
        return {k: (format_time(v) if k in keys and _is_time(v) else with_rfc3339(v, keys))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [with_rfc3339(v, keys) for v in obj]
    return obj


MAX_TIME = 253402300800  # 10000-01-01: past it a year has five digits, which RFC 3339 lacks


def _is_time(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < MAX_TIME


# --------------------------------------------------------------------------- rendering
def apply_query(obj: Any, expression: str | None) -> Any:
    if not expression:
        return obj
    import jmespath
    from jmespath.exceptions import JMESPathError
    try:
        return jmespath.search(expression, obj)
    except JMESPathError as e:
        raise CliError(f"--query {expression!r} is not a valid JMESPath expression: {e}",
                       code="BadQuery", exit_code=EXIT_USAGE) from None


def render(obj: Any, fmt: str) -> str:
    """`obj` as text in `fmt` (no trailing newline; "" for nothing at all)."""
    if fmt == "json":
        return json.dumps(obj, indent=2, sort_keys=True)
    rows, header = _rows(obj)
    if fmt == "tsv":
        return "\n".join("\t".join(_cell(c, tsv=True) for c in row) for row in rows)
    return _table(([header] if header else []) + [[_cell(c) for c in row] for row in rows])


def _rows(obj: Any) -> tuple[list[list[Any]], list[str] | None]:
    """Rows and (for a table) a header. A list of objects: one row each, the union of
    their keys as columns; one object: KEY VALUE rows; a list of lists (a query's
    `[].[a, b]`): those rows; a list of scalars: one a row."""
    if obj is None:
        return [], None
    if isinstance(obj, dict):
        return [[k, v] for k, v in obj.items()], None
    if isinstance(obj, list):
        if obj and all(isinstance(o, dict) for o in obj):
            columns = list(dict.fromkeys(k for o in obj for k in o))
            return [[o.get(c) for c in columns] for o in obj], [c.upper() for c in columns]
        return [list(o) if isinstance(o, list) else [o] for o in obj], None
    return [[obj]], None


def _cell(v: Any, tsv: bool = False) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    text = v if isinstance(v, str) else (str(v) if isinstance(v, (int, float))
                                          else json.dumps(v, separators=(",", ":"), sort_keys=True))
    # One record a line, one field a column, whatever a name or message holds.
    return text.replace("\t", " ").replace("\n", " ") if tsv else text.replace("\n", " ")


def _table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
                     for r in rows)
