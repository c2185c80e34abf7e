"""`nbdserver backup DIR`: the platform's state, taken online, as a restorable data directory.

What a backup holds (docs/operations.md, "Backup and restore"):

- `platform.db`: a consistent copy of the state (`daemonkit.backup.copy_database`):
  encryption sets with their identity credentials sealed under the platform master key,
  every volume's wrapped DEK (its envelope; no DEK is ever stored unwrapped), the
  platform key's URL. Nothing in it opens without the master key and the key service.
- with `include_data`: every volume's ciphertext file, at the same relative path
  (`disks/<uuid>.img`), copied sparse. A disk written during the copy is copied as it is
  at each moment, which no file system check promises to accept: for a consistent image
  of an attached disk, snapshot it first (a snapshot is a frozen, flushed copy) and
  restore the disk from the snapshot. Without it, the data files are the operator's
  (file-system snapshots, `cp --sparse=always`), listed in the manifest.
- the master key only with `include_master_key`: it unseals the encryption sets'
  identity credentials, so a backup that holds it is as secret as the data directory.
  Otherwise restore supplies the original (`--master-key-file`, the systemd credential,
  or DATA_DIR/master.key).
- never `api.token` (a restored platform makes a new one at its first start).

The directory is laid out like a data directory: restored by copying it as one, then
starting `nbdserver serve` on it with the same key service.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from daemonkit.backup import (
    BackupError,
    backup_master_key,
    copy_database,
    private_directory,
    write_manifest,
)

from . import backing
from .copy import copy_ciphertext
from .sealing import platform_key_source

DB_NAME = "platform.db"
MASTER_KEY_NAME = "master.key"


def backup_platform(data_dir: str, dest: str, *, include_data: bool = False,
                    include_master_key: bool = False, master_key_file: str | None = None) -> dict:
    """Write the backup into the new directory `dest`; return its manifest."""
    data_dir = os.path.abspath(data_dir)
    if not os.path.exists(os.path.join(data_dir, DB_NAME)):
        raise BackupError(f"{data_dir} holds no platform state ({DB_NAME})")
    out = private_directory(dest)
    version = copy_database(os.path.join(data_dir, DB_NAME), out / DB_NAME)
    volumes = []
    for kind, name, size, stored in _volumes(out / DB_NAME):
        rel = stored if not os.path.isabs(stored) else backing.layout_path(stored)
        entry = {"kind": kind, "name": name, "size": size, "file": rel or stored}
        source = backing.resolved_path(data_dir, stored)
        if not include_data:
            entry["data"] = "not included"
        elif backing.is_rbd(stored):
            entry["data"] = "not copied: an RBD image (rbd export or snapshots back it up)"
        elif rel is None:
            entry["data"] = "not copied: outside the data directory's layout"
        elif not os.path.exists(source):
            entry["data"] = "missing in the data directory"
        else:
            target = out / rel
            target.parent.mkdir(mode=0o700, exist_ok=True)
            copy_ciphertext(source, str(target), size)
            entry["data"] = "copied"
        volumes.append(entry)
    master = backup_master_key(platform_key_source(data_dir, master_key_file), out,
                               MASTER_KEY_NAME, include_master_key)
    return write_manifest(out, "nbdserver", version, dataDir=data_dir, masterKey=master,
                          volumeData="included" if include_data else "not included",
                          volumes=volumes)


def _volumes(db_path: Path) -> list[tuple[str, str, int, str]]:
    """The volumes of the backup's own copy: the files that go with that moment."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT kind, name, size, path FROM volumes WHERE state = 'ready' "
                          "ORDER BY kind, name").fetchall()
    finally:
        db.close()
