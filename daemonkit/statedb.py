"""Where a daemon's state lives: one interface, two engines (issue 15).

A daemon's state module (keyservice/store.py, nbdserver/platform/state.py) speaks one
SQL dialect, the subset SQLite and PostgreSQL share (`?` placeholders, `INSERT ... ON
CONFLICT DO UPDATE`, `RETURNING`, DDL in SQLite's types); a `Database` runs it and
answers what differs: schema version, a table's columns, JSON access, transactions and
change notification.

- `SqliteDatabase` (statedb_sqlite.py), the embedded default: one file in the data
  directory; `BEGIN IMMEDIATE` makes every write transaction the only one.
- `PostgresDatabase` (statedb_postgres.py), `--state postgresql://...`: several daemons
  on one database. Each write transaction first takes one advisory lock
  (`pg_advisory_xact_lock`, one per daemon kind), so write transactions are serialised
  across processes exactly as SQLite serialises them in one: read-check-write rules
  hold, the key service's audit chains (head read, entry appended, head moved) stay
  single chains, and sequence numbers are handed out in commit order, so a reader of
  `seq > N` never skips a row committed later with a smaller number.

Rows are read by column name (`row["vault"]`) or position, on both engines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StateError(Exception):
    """The state's location is unusable as given: the message says why (no secret in it)."""


class StateUnavailable(Exception):
    """The state's database cannot be reached now (PostgreSQL down, restarting, the
    network cut): the APIs answer 503 with this message, the client may retry, and the
    engine reconnects by itself. No secret in the message."""


class Database(Protocol):
    kind: str
    fresh: bool  # no store was ever made here: a master key may be generated

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def transaction(self) -> AbstractContextManager[None]: ...

    @property
    def in_transaction(self) -> bool: ...  # a transaction of this store's user is open

    def schema_version(self) -> int: ...

    def set_schema_version(self, version: int) -> None: ...

    def columns(self, table: str) -> set[str]: ...

    def create_schema(self, ddl: str) -> None: ...

    def json_number(self, column: str, field: str) -> str: ...

    def announce_change(self) -> None: ...

    def follow_changes(self, wake: Callable[[], None]) -> None: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


def is_postgres(state: str | None) -> bool:
    return bool(state) and str(state).startswith(POSTGRES_SCHEMES)


def open_database(sqlite_path: Path, state: str | None, *, name: str, marker: str) -> Database:
    """`state`: None or "sqlite" (the file `sqlite_path`), or a postgresql:// URL. `name`:
    the daemon's; `marker`: a table every state of that daemon has (fresh without it)."""
    if state is None or state in ("", "sqlite"):
        from .statedb_sqlite import SqliteDatabase
        return SqliteDatabase(Path(sqlite_path))
    if is_postgres(state):
        from .statedb_postgres import PostgresDatabase  # psycopg only where it is used
        return PostgresDatabase(state, name, marker)
    raise StateError("--state takes sqlite (the default) or a postgresql:// URL")

