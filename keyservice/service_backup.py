"""`keyservice backup DIR`: the whole key service's database, taken online.

The database holds every vault, key version (private keys sealed under the master key),
policy, identity (secret hashes only), the audit chains and the change stream: a
consistent copy of it (`daemonkit.backup.copy_database`) is the whole service, once the
master key is there to open it. So the master key goes into the backup only when asked
(`include_master_key`), 0600; otherwise a restore supplies the original
(`--master-key-file`, the systemd credential `master-key`, or DATA_DIR/master-key), kept
apart from the backups so that neither alone reveals a key. `admin.credential` (a
client secret) is never copied: the restored service accepts the same credential, which
its holder keeps.

Not to be confused with Key Vault's per-key backup (`domain/backup_ops.py`), which
exports one key for another vault.
"""

from __future__ import annotations

from pathlib import Path

from daemonkit.backup import (
    BackupError,
    copy_database,
    copy_private_file,
    private_directory,
    write_manifest,
)

from .sealing import master_key_path
from .store import DB_NAME

MASTER_KEY_NAME = "master-key"


def backup_keyservice(data_dir, dest, *, include_master_key: bool = False,
                      master_key_file: str | None = None) -> dict:
    """Write the backup into the new directory `dest`; return its manifest."""
    data_dir = Path(data_dir).absolute()
    if not (data_dir / DB_NAME).exists():
        raise BackupError(f"{data_dir} holds no key service database ({DB_NAME})")
    out = private_directory(dest)
    version = copy_database(data_dir / DB_NAME, out / DB_NAME)
    if include_master_key:
        source, _ = master_key_path(data_dir, master_key_file)
        try:
            copy_private_file(source, out / MASTER_KEY_NAME)
        except OSError as e:
            raise BackupError(f"cannot copy the master key {source}: {e.strerror}") from None
        master = f"included as {MASTER_KEY_NAME}: keep this backup as secret as the master key"
    else:
        master = ("not included: a restore needs the original master key (--master-key-file, the "
                  "systemd credential master-key, or DATA_DIR/master-key)")
    return write_manifest(out, "keyservice", version, dataDir=str(data_dir), masterKey=master)
