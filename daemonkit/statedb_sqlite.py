"""A daemon's state in SQLite (the embedded default; statedb.py has the interface).

WAL mode, synchronous=FULL: a change is durable when its transaction commits, and every
change commits before the reply. One connection, used by one thread at a time:
`BEGIN IMMEDIATE` serialises write transactions, which read-check-write rules need. The
schema's version is SQLite's `PRAGMA user_version`. The file is made 0600 before SQLite
opens it (SQLite gives -wal and -shm the same mode), so it is never readable by others.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class SqliteDatabase:
    kind = "sqlite"

    def __init__(self, path: Path, factory: type[sqlite3.Connection] = sqlite3.Connection):
        self.path = path
        self.fresh = not path.exists()
        if self.fresh:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   factory=factory)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, version: int) -> None:
        # PRAGMA takes no parameters: our own int.
        self._db.execute(f"PRAGMA user_version = {int(version)}")

    def columns(self, table: str) -> set[str]:
        return {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}

    def create_schema(self, ddl: str) -> None:
        """Inside the caller's transaction (executescript would commit it first)."""
        for statement in ddl.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def json_number(self, column: str, field: str) -> str:
        return f"json_extract({column}, '$.{field}')"

    def announce_change(self) -> None:
        """One process per database: it wakes its own listeners."""

    def follow_changes(self, wake: Callable[[], None]) -> None:
        """Nothing to follow: no other process writes this database."""

    def backup_to(self, path: str) -> None:
        """A consistent copy at `path` (SQLite's online backup)."""
        target = sqlite3.connect(path)
        try:
            self._db.backup(target)
        finally:
            target.close()

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def close(self) -> None:
        self._db.close()
