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
    backup_master_key,
    copy_database,
    copy_private_file,
    private_directory,
    write_manifest,
)

from .hsm_seal import FILE as HSM_SEALED_FILE
from .sealing import key_source_of
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
    hsm_sealed = data_dir / HSM_SEALED_FILE
    if hsm_sealed.exists():
        # `--seal pkcs11`: the master key sealed by the HSM; useless without its token,
        # and the only way back to the master key, so it is always part of the backup.
        try:
            copy_private_file(hsm_sealed, out / HSM_SEALED_FILE)
        except OSError as e:
            raise BackupError(f"cannot copy {hsm_sealed}: {e.strerror}") from None
        master = (f"sealed by the HSM, included as {HSM_SEALED_FILE}: a restore needs the same "
                  "PKCS#11 token (--seal pkcs11 with its module, label and PIN)")
        return write_manifest(out, "keyservice", version, dataDir=str(data_dir), masterKey=master)
    master = backup_master_key(key_source_of(data_dir, master_key_file), out, MASTER_KEY_NAME,
                               include_master_key)
    return write_manifest(out, "keyservice", version, dataDir=str(data_dir), masterKey=master)
