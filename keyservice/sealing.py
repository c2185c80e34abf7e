"""The master keys and the seal over everything secret in the key service's state.

Private keys are stored sealed by the sealer both daemons share (`daemonkit.sealer`:
AES-256-GCM, the master key's id in every blob, a keyring of current and older master
keys), under a key derived (HKDF-SHA256) from each master key. The AAD binds each blob
to its row (e.g. the key version's vault/name/version), so a sealed key copied onto
another row fails to open.

The keyring is read from `--master-key-file`, else `$CREDENTIALS_DIRECTORY/master-key`
(systemd credentials), else `DATA_DIR/master-key`, or unsealed by the HSM (`--seal
pkcs11`, hsm_seal.py). It is generated only when the data directory is new (no database
yet) and the path is writable; an existing database without its master key is refused,
never silently re-keyed (`daemonkit.keyring.open_keyring`, the rule of both daemons).

The token signing key, the audit MAC key and the key-backup seal were derived from the
master key. They must outlive a master key rotation (audit chains verify across it, key
backups taken before it still restore), so they are kept in the state, sealed like a
private key (`service_secrets`): taken once from the master key the state was made
with, re-sealed, never re-derived, by a rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from daemonkit.keyring import KEY_BYTES as MASTER_KEY_BYTES
from daemonkit.keyring import Keyring, KeySource, MasterKeyError, key_source, open_keyring, read_keyring
from daemonkit.sealer import Sealer, SealError

__all__ = ["MASTER_KEY_BYTES", "Keyring", "MasterKeyError", "SealError", "Seal", "derive", "key_source_of",
           "master_key_path", "load_master_key", "reader", "service_secrets", "ServiceSecrets"]

SECRETS_META = "service_secrets"  # meta row: the sealed token, audit and backup keys
SECRETS_AAD = "meta:service_secrets"
SEALING_KEY = "sealing_key_id"  # meta row: the key id the last started service seals under


def derive(master: bytes | Keyring, purpose: str) -> bytes:
    """One independent 32-byte key per purpose (sealing, token signing, audit MAC)."""
    if isinstance(master, Keyring):
        master = master.current
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"keyservice/" + purpose.encode()).derive(master)


def _row_key(master: bytes) -> bytes:
    return derive(master, "seal/v1")


class Seal(Sealer):
    """The rows' sealer: daemonkit's, each master key taken through `derive(.., "seal/v1")`
    as before key ids. A single key (a key backup's) is a keyring of one."""

    def __init__(self, master: bytes | Keyring, reload: Callable[[], Keyring] | None = None):
        keyring = master if isinstance(master, Keyring) else Keyring((bytes(master),))
        super().__init__(keyring, _row_key, reload)


def key_source_of(data_dir, option: str | None) -> KeySource:
    return key_source(data_dir, option, credential="master-key", default_name="master-key")


def master_key_path(data_dir: Path, option: str | None) -> tuple[Path, bool]:
    """Where the keyring lives and whether we may create it there."""
    source = key_source_of(data_dir, option)
    return source.path, source.writable


def reader(path: Path) -> Callable[[], Keyring]:
    """The keyring file read again (daemonkit.sealer: another instance re-sealed)."""
    return lambda: read_keyring(Path(path))


def load_master_key(path: Path, may_create: bool, fresh: bool) -> Keyring:
    source = KeySource(Path(path), may_create,
                       "--master-key-file, or the systemd credential 'master-key'")
    return open_keyring(source, holds_sealed_state=not fresh,
                        state="the database in this data directory")


@dataclass(frozen=True)
class ServiceSecrets:
    tokens: bytes  # TokenSigner's HMAC key
    audit: bytes  # the audit chains' MAC key
    backup: bytes  # key backups' own seal (domain/backup_ops.py)

    @property
    def backup_seal(self) -> Seal:
        # Its own key, so a backup blob and a sealed row can never be taken for each other.
        return Seal(self.backup)


def service_secrets(seal: Sealer, stored: str | None) -> tuple[ServiceSecrets, str | None]:
    """The secrets, and the meta value to store when the state had none yet (a state made
    before they were kept): then they are derived, as they always were, from the master
    key, the oldest of the keyring (the one a state of that release was made with: a
    rotation opens the state, keeping its secrets, before it adds a key)."""
    if stored is not None:
        raw = seal.open(bytes.fromhex(stored), SECRETS_AAD)
        return ServiceSecrets(raw[:32], raw[32:64], raw[64:96]), None
    master = seal.keyring.keys[-1]
    secrets = ServiceSecrets(derive(master, "tokens/v1"), derive(master, "audit/v1"),
                             derive(master, "backup/v1"))
    blob = seal.seal(secrets.tokens + secrets.audit + secrets.backup, SECRETS_AAD)
    return secrets, blob.hex()
