"""Online backups of a daemon's SQLite database, and the private directory they go in.

Both daemons keep their state in one SQLite database in WAL mode. `copy_database` takes
a consistent copy while the daemon runs, with SQLite's online backup API
(`sqlite3.Connection.backup`): the copy holds every transaction committed before it
started and none after, whatever the daemon writes meanwhile; a plain file copy of a
WAL database can be torn. The backup command opens the database file itself, so no
API endpoint hands out backups: taking one needs read access to the data directory,
which only the daemon's user (root) has.

A backup directory is private like a data directory: created 0700, every file 0600 from
its first byte, and refused if it exists with anything in it (a backup never merges
into, or is mistaken for, an older one). `manifest.json` lists every file with its size
and SHA-256, so a restore can check what it copies.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path

from .keyring import KeySource

MANIFEST = "manifest.json"
FORMAT = 1  # manifest.json's layout


class BackupError(Exception):
    """The backup cannot be taken: the message says why."""


def private_directory(dest) -> Path:
    """`dest`, created 0700 (with its parents) or existing and empty."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        st = dest.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise BackupError(f"{dest} exists and is not a directory") from None
        if st.st_uid != os.geteuid():
            # Its owner could swap the files after they are written, and a restore would
            # trust the swapped state.
            raise BackupError(f"{dest} belongs to another user (uid {st.st_uid}): give a "
                              "directory of your own, or a new one") from None
        if any(dest.iterdir()):
            raise BackupError(f"{dest} is not empty: give a new directory for each backup") from None
    except OSError as e:
        raise BackupError(f"cannot create {dest}: {e.strerror}") from None
    os.chmod(dest, 0o700)
    return dest


def _create_private(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600))


def copy_database(source, target) -> int:
    """A consistent copy of the live database `source` at `target` (0600); returns its
    schema version (PRAGMA user_version)."""
    source, target = Path(source), Path(target)
    try:
        # mode=rw: an absent database is an error, never an empty one made here.
        src = sqlite3.connect(f"file:{source}?mode=rw", uri=True)
    except sqlite3.Error as e:
        raise BackupError(f"cannot open {source}: {e}") from None
    try:
        src.execute("PRAGMA busy_timeout=5000")  # the daemon may hold the write lock a moment
        _create_private(target)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal
            if dst.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise BackupError(f"the copy of {source} fails SQLite's integrity check")
            return dst.execute("PRAGMA user_version").fetchone()[0]
        finally:
            dst.close()
    except sqlite3.Error as e:
        raise BackupError(f"backing up {source}: {e}") from None
    finally:
        src.close()


def copy_private_file(source, target) -> None:
    """A small secret (a master key) copied 0600 from its first byte."""
    data = Path(source).read_bytes()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def backup_master_key(source: KeySource, out, name: str, include: bool) -> str:
    """The master keyring copied into the backup `out` as `name` (0600, the name a data
    directory gives it), if `include`; what the manifest says about it either way. The keyring file is copied
    whole: every key in it, the older ones a rotation keeps (daemonkit/keyring.py)."""
    if not include:
        return ("not included: a restore needs the original master key "
                f"({source.how_to_supply})")
    try:
        copy_private_file(source.path, Path(out) / name)
    except OSError as e:
        raise BackupError(f"cannot copy the master key {source.path}: {e.strerror}") from None
    return f"included as {name}: keep this backup as secret as the master key"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(dest, service: str, schema_version: int, **facts) -> dict:
    """List every file under `dest` (size, SHA-256) with `facts`; fsync it all."""
    dest = Path(dest)
    files = {}
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        rel = path.relative_to(dest).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": FORMAT, "service": service, "schemaVersion": schema_version,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                **facts, "files": files}
    target = dest / MANIFEST
    _create_private(target)
    with open(target, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_tree(dest)
    return manifest


def _fsync_tree(dest: Path) -> None:
    for path in [*(p for p in dest.rglob("*") if p.is_file()), *(p for p in dest.rglob("*") if p.is_dir()),
                 dest]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
