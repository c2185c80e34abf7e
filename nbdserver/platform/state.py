"""The disk platform's state in SQLite (WAL), every change committed before it is answered.

Only wrapped keys are stored here (`KeyEnvelope`), and the encryption sets' identity
credentials only sealed under the platform master key (`platform.sealing`).

Volume files are named relative to the data directory (`backing`), so the directory may
move. The schema's version is SQLite's `PRAGMA user_version`; `MIGRATIONS` bring an
older database up to `SCHEMA_VERSION` at open, in one transaction (a crash leaves the old
version, and the next start migrates again). A database of a newer release is refused:
its rows may mean what this release does not know.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable

from daemonkit.rfc3339 import format_time

from . import backing
from .errors import InsufficientStorage
from .model import EncryptionSet, KeyEnvelope, Volume, VolumeKind, VolumeState

SCHEMA = """
CREATE TABLE IF NOT EXISTS config (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS encryption_sets (
    name TEXT PRIMARY KEY, subscription TEXT NOT NULL, location TEXT NOT NULL,
    key_url TEXT NOT NULL, identity_object_id TEXT NOT NULL, identity_sealed BLOB NOT NULL,
    allow_cross_subscription INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    auto_rotate INTEGER NOT NULL DEFAULT 0, active_key_url TEXT, last_key_rotation REAL,
    rotation_error TEXT, encryption_type TEXT NOT NULL DEFAULT 'EncryptionAtRestWithCustomerKey');
CREATE TABLE IF NOT EXISTS volumes (
    kind TEXT NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,
    subscription TEXT NOT NULL, location TEXT NOT NULL, des TEXT NOT NULL,
    kid TEXT NOT NULL, alg TEXT NOT NULL, wrapped BLOB NOT NULL,
    path TEXT NOT NULL, state TEXT NOT NULL, source TEXT, gallery TEXT,
    created REAL NOT NULL, extra TEXT NOT NULL DEFAULT '{}',
    platform_kid TEXT, platform_alg TEXT, platform_wrapped BLOB,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL,
    started REAL NOT NULL, ended REAL, view TEXT NOT NULL);
"""
# `operations` (platform.oplog) came without a schema version of its own: a table only
# added, which a release that does not know it never reads, and every open creates.




def _relative_paths(db: sqlite3.Connection, data_dir: str) -> None:
    """Version 1: volume paths relative to the data directory. Releases before stored
    them as given (absolute, or relative to the daemon's working directory); every file
    the platform made is in the data directory's layout, so that is where its row now
    points, wherever the directory was when the row was written."""
    for kind, name, path in db.execute("SELECT kind, name, path FROM volumes").fetchall():
        new = backing.layout_path(path)
        if new is None and os.path.isabs(path):
            new = backing.stored_path(data_dir, path)
        if new is not None and new != path:
            db.execute("UPDATE volumes SET path=? WHERE kind=? AND name=?", (new, kind, name))


def _key_rotation(db: sqlite3.Connection, data_dir: str) -> None:
    """Version 2: an encryption set may follow its key's latest version (`auto_rotate`),
    and records the version its volumes were last re-wrapped to, when, and why the last
    automatic attempt failed. Sets made before are manual (0), their active version not
    yet known: the columns SCHEMA gives a new database, at the same place (appended)."""
    for column in ("auto_rotate INTEGER NOT NULL DEFAULT 0", "active_key_url TEXT",
                   "last_key_rotation REAL", "rotation_error TEXT"):
        db.execute(f"ALTER TABLE encryption_sets ADD COLUMN {column}")


def _double_encryption(db: sqlite3.Connection, data_dir: str) -> None:
    """Version 3: a set's type (double encryption: `EncryptionAtRestWithPlatformAndCustomerKeys`)
    and a volume's second envelope, its platform DEK's. Sets made before are customer-key
    sets and volumes made before have one DEK (NULL): appended, as SCHEMA has them."""
    db.execute("ALTER TABLE encryption_sets ADD COLUMN encryption_type TEXT NOT NULL "
               "DEFAULT 'EncryptionAtRestWithCustomerKey'")
    for column in ("platform_kid TEXT", "platform_alg TEXT", "platform_wrapped BLOB"):
        db.execute(f"ALTER TABLE volumes ADD COLUMN {column}")


# MIGRATIONS[n] brings a database of version n to n + 1. Version 0 is every database of
# the releases before versioning (the SCHEMA above, without user_version).
MIGRATIONS: list[Callable[[sqlite3.Connection, str], None]] = [_relative_paths, _key_rotation,
                                                               _double_encryption]
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was written by a newer release; this one must not guess at it."""


SQLITE_FULL = 13  # "database or disk is full" (sqlite3.h)


class _Connection(sqlite3.Connection):
    """A full file system is InsufficientStorage (507), not an internal error: every
    state change goes through execute()."""

    def execute(self, *args):
        try:
            return super().execute(*args)
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) == SQLITE_FULL:
                raise InsufficientStorage(f"the platform's state database cannot grow: {e}") from None
            raise


def _private_files(path: str) -> None:
    """The database exists 0600 before SQLite opens it, whatever the umask or the
    directory's mode: SQLite gives its -wal and -shm files the database's own mode. A
    database left 0644 by an older version (and its -wal/-shm) is tightened."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for p in (path, path + "-wal", path + "-shm"):
        try:
            os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


class State:
    def __init__(self, path: str, data_dir: str | None = None):
        self.data_dir = os.path.abspath(data_dir or os.path.dirname(path))
        _private_files(path)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                  factory=_Connection)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed change survives power loss
        self.db.execute("PRAGMA busy_timeout=5000")  # a backup's read may hold the lock briefly
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction():
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the platform state {self.data_dir} has schema version {version}, written "
                    f"by a newer release; this one knows up to {SCHEMA_VERSION}. Run the newer "
                    "release, or restore the backup taken before the upgrade (docs/operations.md)")
            fresh = self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            if not fresh:
                for migrate in MIGRATIONS[version:]:
                    migrate(self.db, self.data_dir)
            # An f-string: PRAGMA takes no parameters; SCHEMA_VERSION is this module's int.
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def backup_to(self, path: str) -> None:
        """A consistent copy of the whole database at `path` (created 0600), taken with
        SQLite's online backup while the platform keeps changing it: every committed
        change up to one moment, none after."""
        _private_files(path)
        target = sqlite3.connect(path)
        try:
            self.db.backup(target)
        finally:
            target.close()

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        return _Tx(self.db)

    # -- config
    def get_config(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM config WHERE k=?", (key,)).fetchone()
        return row[0] if row else None

    def set_config(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO config VALUES (?, ?)", (key, value))

    # -- encryption sets
    def put_des(self, d: EncryptionSet) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO encryption_sets ({_DES_COLUMNS}) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (d.name, d.subscription, d.location, d.key_url, d.identity_object_id, d.identity_sealed,
             int(d.allow_cross_subscription), d.created or time.time(), int(d.auto_rotate),
             d.active_key_url, d.last_key_rotation,
             None if d.rotation_error is None else json.dumps(d.rotation_error),
             d.encryption_type))

    def get_des(self, name: str) -> EncryptionSet | None:
        row = self.db.execute(f"SELECT {_DES_COLUMNS} FROM encryption_sets WHERE name=?",
                              (name,)).fetchone()
        return _des(row) if row else None

    def list_des(self) -> list[EncryptionSet]:
        return [_des(r) for r in self.db.execute(
            f"SELECT {_DES_COLUMNS} FROM encryption_sets ORDER BY name")]

    def set_des_rotation(self, name: str, *, active_key_url: str | None, rotated: float | None,
                         error: dict | None) -> None:
        """Record a rotation's outcome alone: the rest of the row (its key URL, changed by a
        manual rotation meanwhile) stays as it is. `rotated` None keeps the last time."""
        self.db.execute(
            "UPDATE encryption_sets SET active_key_url=coalesce(?, active_key_url), "
            "last_key_rotation=coalesce(?, last_key_rotation), rotation_error=? WHERE name=?",
            (active_key_url, rotated, None if error is None else json.dumps(error), name))

    def delete_des(self, name: str) -> None:
        self.db.execute("DELETE FROM encryption_sets WHERE name=?", (name,))

    # -- volumes
    def put_volume(self, v: Volume) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO volumes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (v.kind.value, v.name, v.size, v.subscription, v.location, v.des, v.envelope.kid,
             v.envelope.alg, v.envelope.wrapped, backing.stored_path(self.data_dir, v.path),
             v.state.value, v.source, v.gallery,
             v.created or time.time(), json.dumps(v.extra), *_platform_envelope(v)))

    def get_volume(self, kind: VolumeKind, name: str) -> Volume | None:
        row = self.db.execute("SELECT * FROM volumes WHERE kind=? AND name=?", (kind.value, name)).fetchone()
        return self._volume(row) if row else None

    def list_volumes(self, kind: VolumeKind | None = None, *, des: str | None = None) -> list[Volume]:
        q, args = "SELECT * FROM volumes WHERE 1=1", []
        if kind is not None:
            q += " AND kind=?"
            args.append(kind.value)
        if des is not None:
            q += " AND des=?"
            args.append(des)
        return [self._volume(r) for r in self.db.execute(q + " ORDER BY kind, name", args)]

    def _volume(self, r) -> Volume:
        return Volume(name=r[1], kind=VolumeKind(r[0]), size=r[2], subscription=r[3],
                      location=r[4], des=r[5], envelope=KeyEnvelope(r[6], r[7], bytes(r[8])),
                      path=backing.resolved_path(self.data_dir, r[9]),
                      state=VolumeState(r[10]), source=r[11], gallery=r[12], created=r[13],
                      extra=json.loads(r[14] or "{}"),
                      platform_envelope=KeyEnvelope(r[15], r[16], bytes(r[17])) if r[15] else None)

    def replace_envelope(self, v: Volume, old: KeyEnvelope, new: KeyEnvelope, des: str) -> bool:
        """Re-wrap `v` only if its row still holds `old` (compare and set): a volume deleted
        or re-wrapped by someone else meanwhile is neither brought back nor overwritten."""
        cur = self.db.execute(
            "UPDATE volumes SET kid=?, alg=?, wrapped=?, des=? "
            "WHERE kind=? AND name=? AND kid=? AND alg=? AND wrapped=?",
            (new.kid, new.alg, new.wrapped, des, v.kind.value, v.name, old.kid, old.alg, old.wrapped))
        return cur.rowcount == 1

    def set_gallery(self, kind: VolumeKind, name: str, gallery: str | None) -> None:
        self.db.execute("UPDATE volumes SET gallery=? WHERE kind=? AND name=?",
                        (gallery, kind.value, name))

    # -- long operations (platform.oplog): the view a client sees, as JSON
    def put_operation(self, op: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO operations VALUES (?,?,?,?,?,?)",
                        (op["id"], op["kind"], op["status"], op["started"], op.get("ended"),
                         json.dumps(op)))

    def get_operation(self, op_id: str) -> dict | None:
        row = self.db.execute("SELECT view FROM operations WHERE id=?", (op_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def list_operations(self, limit: int) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute(
            "SELECT view FROM operations ORDER BY started DESC LIMIT ?", (limit,))]

    def forget_operations(self, keep: int, ended_before: float) -> int:
        """Delete finished operations that ended before `ended_before`, and all but the
        `keep` that ended last; a running one is never deleted. Returns how many went."""
        return self.db.execute(
            "DELETE FROM operations WHERE status != 'running' AND (ended < ? OR id NOT IN "
            "(SELECT id FROM operations WHERE status != 'running' ORDER BY ended DESC LIMIT ?))",
            (ended_before, keep)).rowcount

    def interrupt_running_operations(self, now: float, error: dict) -> int:
        """Every operation still marked running: its process is gone (see oplog)."""
        with self.transaction():
            rows = self.db.execute("SELECT view FROM operations WHERE status='running'").fetchall()
            for (view,) in rows:
                op = json.loads(view)
                op.update(status="interrupted", error=dict(error), ended=now,
                          endTime=format_time(now))
                self.put_operation(op)
        return len(rows)

    def delete_volume(self, kind: VolumeKind, name: str) -> None:
        self.db.execute("DELETE FROM volumes WHERE kind=? AND name=?", (kind.value, name))


class _Tx:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


_DES_COLUMNS = ("name, subscription, location, key_url, identity_object_id, identity_sealed, "
                "allow_cross_subscription, created, auto_rotate, active_key_url, "
                "last_key_rotation, rotation_error, encryption_type")


def _des(r) -> EncryptionSet:
    return EncryptionSet(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), bool(r[6]), r[7],
                         auto_rotate=bool(r[8]), active_key_url=r[9], last_key_rotation=r[10],
                         rotation_error=json.loads(r[11]) if r[11] else None,
                         encryption_type=r[12])


def _platform_envelope(v: Volume) -> tuple:
    e = v.platform_envelope
    return (None, None, None) if e is None else (e.kid, e.alg, e.wrapped)

