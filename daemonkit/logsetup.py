"""The log output of both daemons: `--log-format text|json` and `--log-level`.

Text is one line per record, as before. JSON is one object per line (what journald
forwarders, Loki and Elasticsearch read without a parsing rule): `time` (RFC 3339, UTC),
`level`, `logger`, `message`, and the fields a caller passes with `extra=` (`request_id`,
`peer`, `export`, ...), so a request's lines can be found by its id.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
# Fields every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                        "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname,
                                  "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send the process's log to stderr at `level` in `fmt`. Both are checked by the
    CLIs' option parsing (click.Choice over LEVELS and FORMATS): an unknown level is a
    usage error there, never a silent INFO here."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def current_format() -> str:
    """The format `configure` set up (what a helper process this one starts should use)."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"
