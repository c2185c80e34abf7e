"""The key service's state database: SQLite in the data directory, or PostgreSQL
(`daemonkit.statedb` has the interface and the engines)."""

from pathlib import Path

from daemonkit.statedb import Database, StateError, is_postgres, open_database

DB_NAME = "keyservice.db"  # in the data directory, when the state is SQLite

__all__ = ["DB_NAME", "Database", "StateError", "is_postgres", "open_state"]


def open_state(data_dir: Path, state: str | None) -> Database:
    return open_database(Path(data_dir) / DB_NAME, state, name="keyservice", marker="meta")
