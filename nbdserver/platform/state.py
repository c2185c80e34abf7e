"""The disk platform's state, every change committed before it is answered: in SQLite
(WAL) in the data directory by default, or in PostgreSQL (`--state postgresql://...`)
that several servers share (`daemonkit.statedb`: one interface, both engines; the SQL
here is what both speak, DDL in SQLite's types).

Only wrapped keys are stored here (`KeyEnvelope`), and the encryption sets' identity
credentials only sealed under the platform master key (`platform.sealing`).

Volume files are named relative to the data directory (`backing`), so the directory may
move. The schema's version is SQLite's `PRAGMA user_version` (PostgreSQL: the
`schema_version` table); `MIGRATIONS` bring an older database up to `SCHEMA_VERSION` at
open, in one transaction, on either engine (a crash leaves the old version, and the next
start migrates again). A database of a newer release is refused: its rows may mean what
this release does not know.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from daemonkit.rfc3339 import format_time
from daemonkit.statedb import Database, StateError, is_postgres
from daemonkit.statedb_sqlite import SqliteDatabase

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
CREATE TABLE IF NOT EXISTS disk_leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS server_leases (holder TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS volume_creators (
    kind TEXT NOT NULL, name TEXT NOT NULL, holder TEXT NOT NULL, PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS operation_runners (id TEXT PRIMARY KEY, holder TEXT NOT NULL);
"""
# `operations` (platform.oplog), `disk_leases`, `server_leases`, `volume_creators` and
# `operation_runners` (platform.leases) came without a schema version of their own: a table only
# added, which a release that does not know it never reads, and every open creates.




def _relative_paths(db: Database, data_dir: str) -> None:
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


def _key_rotation(db: Database, data_dir: str) -> None:
    """Version 2: an encryption set may follow its key's latest version (`auto_rotate`),
    and records the version its volumes were last re-wrapped to, when, and why the last
    automatic attempt failed. Sets made before are manual (0), their active version not
    yet known: the columns SCHEMA gives a new database, at the same place (appended)."""
    for column in ("auto_rotate INTEGER NOT NULL DEFAULT 0", "active_key_url TEXT",
                   "last_key_rotation REAL", "rotation_error TEXT"):
        db.execute(f"ALTER TABLE encryption_sets ADD COLUMN {column}")


def _double_encryption(db: Database, data_dir: str) -> None:
    """Version 3: a set's type (double encryption: `EncryptionAtRestWithPlatformAndCustomerKeys`)
    and a volume's second envelope, its platform DEK's. Sets made before are customer-key
    sets and volumes made before have one DEK (NULL): appended, as SCHEMA has them."""
    db.execute("ALTER TABLE encryption_sets ADD COLUMN encryption_type TEXT NOT NULL "
               "DEFAULT 'EncryptionAtRestWithCustomerKey'")
    for column in ("platform_kid TEXT", "platform_alg TEXT", "platform_wrapped BLOB"):
        db.execute(f"ALTER TABLE volumes ADD COLUMN {column}")


# MIGRATIONS[n] brings a database of version n to n + 1. Version 0 is every database of
# the releases before versioning (the SCHEMA above, without user_version).
# A step gets the database of either engine: SQL both speak, DDL in SQLite's types.
MIGRATIONS: list[Callable[[Database, str], None]] = [_relative_paths, _key_rotation,
                                                               _double_encryption]
SCHEMA_VERSION = len(MIGRATIONS)
# The `config` row of `State.disk_generation` (a row of a table every version has: no
# migration; a database without it is at generation 0).
DISK_GENERATION = "disk_generation"


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
    """`path`: the SQLite file; `state_url`: a postgresql:// URL instead (several servers
    on one platform; the data directory then holds volume files and keys, not state)."""

    def __init__(self, path: str, data_dir: str | None = None, state_url: str | None = None):
        # The server lease (platform.leases) of this process, when several servers share
        # the state: recorded with each volume it leaves CREATING, so that another
        # server's start-up sweep removes only what a dead server left unfinished.
        self.creator: str | None = None
        self.data_dir = os.path.abspath(data_dir or os.path.dirname(path))
        self.db: Database
        if state_url and not is_postgres(state_url):
            raise StateError("--state takes sqlite (the default) or a postgresql:// URL")
        if is_postgres(state_url):
            from daemonkit.statedb_postgres import PostgresDatabase  # psycopg where used
            assert state_url is not None
            self.db = PostgresDatabase(state_url, "nbdserver", marker="volumes")
        else:
            _private_files(path)
            # WAL, synchronous=FULL (a committed change survives power loss), and a busy
            # timeout (a backup's read may hold the lock briefly): statedb_sqlite.py.
            self.db = SqliteDatabase(Path(path), factory=_Connection)
        try:
            self._migrate()
        except BaseException:
            self.db.close()
            raise

    @property
    def kind(self) -> str:
        return self.db.kind

    def describe(self) -> str:
        """Where the state is, for logs (never a password)."""
        return self.db.describe()

    def _migrate(self) -> None:
        with self.transaction():
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the platform state {self.data_dir} has schema version {version}, written "
                    f"by a newer release; this one knows up to {SCHEMA_VERSION}. Run the newer "
                    "release, or restore the backup taken before the upgrade (docs/operations.md)")
            # Fresh: no platform was kept here (a master key may be made, nothing migrates).
            self.fresh = fresh = not self.db.columns("volumes")
            self.db.create_schema(SCHEMA)
            if not fresh:
                for migrate in MIGRATIONS[version:]:
                    migrate(self.db, self.data_dir)
            self.db.set_schema_version(SCHEMA_VERSION)

    def schema_version(self) -> int:
        return self.db.schema_version()

    def backup_to(self, path: str) -> None:
        """A consistent copy of the whole database at `path` (created 0600), taken with
        SQLite's online backup while the platform keeps changing it: every committed
        change up to one moment, none after."""
        if not isinstance(self.db, SqliteDatabase):
            raise StateError(f"the platform's state is in {self.db.describe()}: back it up "
                             "with pg_dump (docs/operations.md, \"State on PostgreSQL\")")
        _private_files(path)
        self.db.backup_to(path)

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        """A write transaction: the only one running on this state until it ends."""
        return self.db.transaction()

    # -- config
    def get_config(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM config WHERE k=?", (key,)).fetchone()
        return row["v"] if row else None

    def set_config(self, key: str, value: str) -> None:
        self.db.execute(_upsert("config", "k, v", "k"), (key, value))

    # -- encryption sets
    def put_des(self, d: EncryptionSet) -> None:
        self.db.execute(
            _upsert("encryption_sets", _DES_COLUMNS, "name"),
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

    def replace_des_sealed(self, name: str, old: bytes, new: bytes) -> bool:
        """A set's credential re-sealed under a new master key (sealing.reseal), only if
        it is still `old`: the rest of the row is another server's to change meanwhile."""
        return self.db.execute("UPDATE encryption_sets SET identity_sealed=? WHERE name=? AND "
                               "identity_sealed=?", (new, name, old)).rowcount == 1

    def delete_des(self, name: str) -> None:
        self.db.execute("DELETE FROM encryption_sets WHERE name=?", (name,))

    # -- the disks' generation: what other servers follow (platform/leases.py)
    def disk_generation(self) -> int:
        """A number that changes whenever a disk's row is written or removed (put_volume,
        delete_volume): a server sharing this state looks at every disk again only when
        it moved, instead of decoding thousands of rows each lease period."""
        value = self.get_config(DISK_GENERATION)
        return int(value) if value else 0

    def _disk_changed(self) -> None:
        # One statement, atomic on both engines; in the caller's transaction if any.
        self.db.execute("INSERT INTO config (k, v) VALUES (?, '1') ON CONFLICT (k) DO UPDATE "
                        "SET v = CAST(CAST(config.v AS INTEGER) + 1 AS TEXT)", (DISK_GENERATION,))

    def disk_rows(self) -> dict[str, tuple[str, VolumeState, int]]:
        """Every disk's file, state and size by name: what a catalog follows, without
        decoding envelopes (`list_volumes` costs several times more per row)."""
        return {r["name"]: (backing.resolved_path(self.data_dir, r["path"]), VolumeState(r["state"]),
                            r["size"])
                for r in self.db.execute("SELECT name, path, state, size FROM volumes WHERE kind=?",
                                         (VolumeKind.DISK.value,))}

    def disk_scopes(self) -> set[str]:
        """The scopes (encryption sets, or PLATFORM_KEY) that wrap some disk's DEK."""
        return {r["des"] for r in self.db.execute("SELECT DISTINCT des FROM volumes WHERE kind=?",
                                                  (VolumeKind.DISK.value,))}

    def disk_key_groups(self, des: str) -> dict[str, tuple[KeyEnvelope, list[str]]]:
        """The disks of scope `des` by the key version (kid) that wrapped their DEKs: one
        of those envelopes and every disk's name. What a revocation check needs, without
        decoding whole volumes (`list_volumes` costs several times more per row)."""
        groups: dict[str, tuple[KeyEnvelope, list[str]]] = {}
        for r in self.db.execute("SELECT name, kid, alg, wrapped FROM volumes WHERE kind=? AND des=? "
                                 "ORDER BY name", (VolumeKind.DISK.value, des)):
            group = groups.get(r["kid"])
            if group is None:
                groups[r["kid"]] = (KeyEnvelope(r["kid"], r["alg"], bytes(r["wrapped"])), [r["name"]])
            else:
                group[1].append(r["name"])
        return groups

    # -- volumes
    def _one_commit(self) -> AbstractContextManager[None]:
        """Statements that belong together, committed once: a transaction of their own,
        or the caller's if one is open. With SQLite's synchronous=FULL every commit is an
        fsync of the log, on the event loop: a disk's creation wrote six of them, one per
        statement, where it needs two."""
        return nullcontext() if self.db.in_transaction else self.transaction()

    def put_volume(self, v: Volume) -> None:
        # The creator's row with the volume's and gone with its last write: no sweep sees
        # a CREATING volume without it while its creator lives.
        with self._one_commit():
            if v.state is VolumeState.CREATING and self.creator is not None:
                self.db.execute(_upsert("volume_creators", "kind, name, holder", "kind, name"),
                                (v.kind.value, v.name, self.creator))
            self._put_volume_row(v)
            if v.state is not VolumeState.CREATING:
                self.db.execute("DELETE FROM volume_creators WHERE kind=? AND name=?",
                                (v.kind.value, v.name))
            if v.kind is VolumeKind.DISK:
                self._disk_changed()

    def _put_volume_row(self, v: Volume) -> None:
        self.db.execute(
            _upsert("volumes", _VOLUME_COLUMNS, "kind, name"),
            (v.kind.value, v.name, v.size, v.subscription, v.location, v.des, v.envelope.kid,
             v.envelope.alg, v.envelope.wrapped, backing.stored_path(self.data_dir, v.path),
             v.state.value, v.source, v.gallery,
             v.created or time.time(), json.dumps(v.extra), *_platform_envelope(v)))

    def get_volume(self, kind: VolumeKind, name: str) -> Volume | None:
        row = self.db.execute(f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE kind=? AND name=?",
                              (kind.value, name)).fetchone()
        return self._volume(row) if row else None

    def list_volumes(self, kind: VolumeKind | None = None, *, des: str | None = None) -> list[Volume]:
        q, args = f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE 1=1", []
        if kind is not None:
            q += " AND kind=?"
            args.append(kind.value)
        if des is not None:
            q += " AND des=?"
            args.append(des)
        return [self._volume(r) for r in self.db.execute(q + " ORDER BY kind, name", args)]

    def _volume(self, r) -> Volume:
        return Volume(name=r["name"], kind=VolumeKind(r["kind"]), size=r["size"],
                      subscription=r["subscription"], location=r["location"], des=r["des"],
                      envelope=KeyEnvelope(r["kid"], r["alg"], bytes(r["wrapped"])),
                      path=backing.resolved_path(self.data_dir, r["path"]),
                      state=VolumeState(r["state"]), source=r["source"], gallery=r["gallery"],
                      created=r["created"], extra=json.loads(r["extra"] or "{}"),
                      platform_envelope=KeyEnvelope(r["platform_kid"], r["platform_alg"],
                                                    bytes(r["platform_wrapped"]))
                      if r["platform_kid"] else None)

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
        # As put_volume's creator: the runner's row with the operation's, one commit
        # (leases.py).
        running = op["status"] == "running"
        with self._one_commit():
            if running and self.creator is not None:
                self.db.execute(_upsert("operation_runners", "id, holder", "id"),
                                (op["id"], self.creator))
            self.db.execute(_upsert("operations", "id, kind, status, started, ended, view", "id"),
                            (op["id"], op["kind"], op["status"], op["started"], op.get("ended"),
                             json.dumps(op)))
            if not running:
                self.db.execute("DELETE FROM operation_runners WHERE id=?", (op["id"],))

    def get_operation(self, op_id: str) -> dict | None:
        row = self.db.execute("SELECT view FROM operations WHERE id=?", (op_id,)).fetchone()
        return json.loads(row["view"]) if row else None

    def list_operations(self, limit: int) -> list[dict]:
        return [json.loads(r["view"]) for r in self.db.execute(
            "SELECT view FROM operations ORDER BY started DESC LIMIT ?", (limit,))]

    def forget_operations(self, keep: int, ended_before: float) -> int:
        """Delete finished operations that ended before `ended_before`, and all but the
        `keep` that ended last; a running one is never deleted. Returns how many went."""
        return self.db.execute(
            "DELETE FROM operations WHERE status != 'running' AND (ended < ? OR id NOT IN "
            "(SELECT id FROM operations WHERE status != 'running' ORDER BY ended DESC LIMIT ?))",
            (ended_before, keep)).rowcount

    def interrupt_running_operations(self, now: float, error: dict) -> int:
        """Every operation still marked running whose process is gone (see oplog): none
        recorded (one server alone), or its server lease expired or released. A live
        server's running operation is its own to finish."""
        with self.transaction():
            rows = self.db.execute(
                "SELECT view FROM operations o WHERE status='running' AND NOT EXISTS ("
                "SELECT 1 FROM operation_runners r JOIN server_leases s ON s.holder = r.holder "
                "WHERE r.id = o.id AND s.expires >= ?)", (now,)).fetchall()
            for (view,) in rows:
                op = json.loads(view)
                op.update(status="interrupted", error=dict(error), ended=now,
                          endTime=format_time(now))
                self.put_operation(op)
        return len(rows)

    # -- disk leases (platform.leases): which of the servers sharing this state serves a disk
    def take_lease(self, name: str, holder: str, now: float, ttl: float) -> bool:
        """Hold (or keep holding) `name`'s lease until now + ttl, unless another holder's
        has not expired. One statement: two servers racing for it cannot both win."""
        cur = self.db.execute(
            "INSERT INTO disk_leases (name, holder, expires) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET holder=excluded.holder, expires=excluded.expires "
            "WHERE disk_leases.holder = excluded.holder OR disk_leases.expires < ?",
            (name, holder, now + ttl, now))
        return cur.rowcount == 1

    def renew_leases(self, holder: str, now: float, ttl: float) -> set[str]:
        """Extend every lease `holder` still holds; their disks' names. A lease another
        server took over is not among them."""
        self.db.execute("UPDATE disk_leases SET expires=? WHERE holder=?", (now + ttl, holder))
        return {r["name"] for r in self.db.execute("SELECT name FROM disk_leases WHERE holder=?",
                                                   (holder,))}

    def release_lease(self, name: str, holder: str) -> None:
        self.db.execute("DELETE FROM disk_leases WHERE name=? AND holder=?", (name, holder))

    def lease_holder(self, name: str, now: float) -> str | None:
        row = self.db.execute("SELECT holder FROM disk_leases WHERE name=? AND expires >= ?",
                              (name, now)).fetchone()
        return row["holder"] if row else None

    def delete_volume(self, kind: VolumeKind, name: str) -> None:
        with self._one_commit():
            self.db.execute("DELETE FROM volumes WHERE kind=? AND name=?", (kind.value, name))
            self.db.execute("DELETE FROM volume_creators WHERE kind=? AND name=?", (kind.value, name))
            if kind is VolumeKind.DISK:
                self._disk_changed()

    # -- server leases (platform.leases): which servers sharing this state are alive
    def renew_server_lease(self, holder: str, now: float, ttl: float) -> None:
        self.db.execute(_upsert("server_leases", "holder, expires", "holder"), (holder, now + ttl))

    def release_server_lease(self, holder: str) -> None:
        self.db.execute("DELETE FROM server_leases WHERE holder=?", (holder,))

    def unfinished_volumes(self, now: float) -> list[Volume]:
        """Volumes left CREATING by a server that is gone: no creator recorded (one
        server alone, or an older release), or the creator's server lease has expired
        or was released. A live server's unfinished volume is its own to finish."""
        rows = self.db.execute(
            f"SELECT {_VOLUME_COLUMNS} FROM volumes v WHERE state=? AND NOT EXISTS ("
            "SELECT 1 FROM volume_creators c JOIN server_leases s ON s.holder = c.holder "
            "WHERE c.kind = v.kind AND c.name = v.name AND s.expires >= ?) ORDER BY kind, name",
            (VolumeState.CREATING.value, now))
        return [self._volume(r) for r in rows]

    def forget_server_leases(self, now: float) -> None:
        """The expired server leases (their servers' CREATING volumes are then swept
        all the same). Creator rows are left: one may be written just before its volume."""
        self.db.execute("DELETE FROM server_leases WHERE expires < ?", (now,))


def _upsert(table: str, columns: str, key: str) -> str:
    """INSERT, or UPDATE the row with the same `key`: what SQLite alone calls INSERT OR
    REPLACE, as both engines spell it."""
    names = [c.strip() for c in columns.split(",")]
    keys = {k.strip() for k in key.split(",")}
    sets = ", ".join(f"{c}=excluded.{c}" for c in names if c not in keys)
    return (f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {sets}")


_VOLUME_COLUMNS = ("kind, name, size, subscription, location, des, kid, alg, wrapped, path, state, "
                   "source, gallery, created, extra, platform_kid, platform_alg, platform_wrapped")
_DES_COLUMNS = ("name, subscription, location, key_url, identity_object_id, identity_sealed, "
                "allow_cross_subscription, created, auto_rotate, active_key_url, "
                "last_key_rotation, rotation_error, encryption_type")


def _des(r) -> EncryptionSet:
    return EncryptionSet(r["name"], r["subscription"], r["location"], r["key_url"],
                         r["identity_object_id"], bytes(r["identity_sealed"]),
                         bool(r["allow_cross_subscription"]), r["created"],
                         auto_rotate=bool(r["auto_rotate"]), active_key_url=r["active_key_url"],
                         last_key_rotation=r["last_key_rotation"],
                         rotation_error=json.loads(r["rotation_error"]) if r["rotation_error"] else None,
                         encryption_type=r["encryption_type"])


def _platform_envelope(v: Volume) -> tuple:
    e = v.platform_envelope
    return (None, None, None) if e is None else (e.kid, e.alg, e.wrapped)

