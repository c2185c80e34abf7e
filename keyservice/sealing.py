"""The master key and the seal over everything secret in the database.

Private keys are stored sealed with AES-256-GCM under a key derived (HKDF-SHA256)
from the master key. The AAD binds each blob to its row (e.g. the key version's
vault/name/version), so a sealed key copied onto another row fails to open.
Sealed blob layout: b"\\x01" (format version) || 12-byte random nonce || ciphertext+tag.

The master key is 32 bytes, from `--master-key-file`, else
`$CREDENTIALS_DIRECTORY/master-key` (systemd credentials), else
`DATA_DIR/master-key`. It is generated only when the data directory is new
(no database yet) and the path is writable; an existing database without its
master key is refused, never silently re-keyed.
"""
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT = b"\x01"
MASTER_KEY_BYTES = 32


class MasterKeyError(Exception):
    """The service cannot start: the message says why and what to do."""


class SealError(Exception):
    """A sealed blob did not open: wrong master key, or the row was tampered with."""


def master_key_path(data_dir: Path, option: str | None) -> tuple[Path, bool]:
    """Where the master key lives and whether we may create it there."""
    if option:
        return Path(option), True
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        return Path(creds) / "master-key", False  # systemd's directory is read-only
    return data_dir / "master-key", True


def load_master_key(path: Path, may_create: bool, fresh: bool) -> bytes:
    if not path.exists():
        if not fresh:
            raise MasterKeyError(
                f"master key not found at {path}: the database in this data directory is sealed "
                "under a master key; pass it with --master-key-file or as the systemd credential "
                "'master-key'")
        if not may_create:
            raise MasterKeyError(f"master key not found at {path} (systemd credential 'master-key')")
        key = secrets.token_bytes(MASTER_KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return key
    raw = path.read_bytes()
    if len(raw) == MASTER_KEY_BYTES:
        return raw
    text = raw.strip()
    if len(text) == 2 * MASTER_KEY_BYTES:
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    raise MasterKeyError(f"master key at {path} must be {MASTER_KEY_BYTES} raw bytes or "
                         f"{2 * MASTER_KEY_BYTES} hex digits")


def derive(master: bytes, purpose: str) -> bytes:
    """One independent 32-byte key per purpose (sealing, token signing, audit MAC)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"keyservice/" + purpose.encode()).derive(master)


class Seal:
    def __init__(self, master: bytes):
        self._aead = AESGCM(derive(master, "seal/v1"))

    def seal(self, plaintext: bytes, aad: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return FORMAT + nonce + self._aead.encrypt(nonce, plaintext, aad.encode())

    def open(self, blob: bytes, aad: str) -> bytes:
        blob = bytes(blob)
        if blob[:1] != FORMAT or len(blob) < 1 + 12 + 16:
            raise SealError("unknown sealed format")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], aad.encode())
        except InvalidTag:
            raise SealError(f"sealed data for {aad} did not open") from None
