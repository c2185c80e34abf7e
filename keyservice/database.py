"""Where the store's rows live: one interface, two engines.

`Store` (store.py) speaks one SQL dialect, the subset SQLite and PostgreSQL share
(`?` placeholders, `INSERT ... ON CONFLICT DO UPDATE`, `RETURNING`); a `Database`
runs it and answers what differs: schema version, a table's columns, the types of
the DDL, JSON access, transactions and change notification.

- `SqliteDatabase` (database_sqlite.py), the embedded default: one file in the data
  directory; `BEGIN IMMEDIATE` makes every write transaction the only one.
- `PostgresDatabase` (database_postgres.py), `--state postgresql://...`: several
  `keyservice serve` instances on one database. Each write transaction first takes one
  advisory lock (`pg_advisory_xact_lock`), so write transactions are serialised across
  instances exactly as SQLite serialises them in one: the domain's read-check-write
  rules hold, the audit chains (head read, entry appended, head moved) stay single
  chains, and the change stream's sequence numbers are handed out in commit order, so a
  subscriber reading `seq > N` never skips a row committed later with a smaller number.

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


class Database(Protocol):
    kind: str
    fresh: bool  # no store was ever made here: a master key may be generated

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def transaction(self) -> AbstractContextManager[None]: ...

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


def open_database(data_dir: Path, state: str | None, sqlite_name: str) -> Database:
    """`state`: None (SQLite in the data directory) or a postgresql:// URL."""
    if state is None or state in ("", "sqlite"):
        from .database_sqlite import SqliteDatabase
        return SqliteDatabase(Path(data_dir) / sqlite_name)
    if is_postgres(state):
        from .database_postgres import PostgresDatabase
        return PostgresDatabase(state)
    raise StateError("--state takes sqlite (the default) or a postgresql:// URL")

