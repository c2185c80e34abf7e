"""Sealing platform secrets at rest (the encryption sets' identity credentials).

AES-256-GCM from `cryptography` under a 32-byte platform master key, read from
`--master-key-file`, or `$CREDENTIALS_DIRECTORY/platform-master-key` (systemd
LoadCredential=), or generated on first start as DATA_DIR/master.key (mode 0600).
Sealed blobs are self-describing: a format byte, the nonce, then ciphertext+tag; the
associated data binds a blob to the record it belongs to, so blobs cannot be swapped.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = b"\x01"


class MasterKeyError(Exception):
    pass


def load_master_key(data_dir: str, path: str | None = None, *, may_create: bool = True) -> bytes:
    """The master key; DATA_DIR/master.key is made only with `may_create` (a new state):
    a state sealed under a key that went missing is refused, never silently re-keyed
    (its encryption sets' credentials would no longer open)."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if path is None and creds and os.path.exists(os.path.join(creds, "platform-master-key")):
        path = os.path.join(creds, "platform-master-key")
    if path is None:
        path = os.path.join(data_dir, "master.key")
        if not os.path.exists(path):
            if not may_create:
                raise MasterKeyError(
                    f"the platform master key {path} is missing, and the state in {data_dir} is "
                    "sealed under it: supply the original (--master-key-file, the systemd "
                    "credential platform-master-key, or DATA_DIR/master.key; docs/operations.md, "
                    "\"Backup and restore\")")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
    try:
        with open(path, "rb") as f:
            key = f.read()
    except OSError as e:
        raise MasterKeyError(f"cannot read the platform master key {path}: {e.strerror}") from None
    if len(key) != 32:
        raise MasterKeyError(f"platform master key {path} must be exactly 32 bytes, found {len(key)}")
    return key


class Sealer:
    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(12)
        return FORMAT + nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def unseal(self, blob: bytes, context: str) -> bytes:
        if blob[:1] != FORMAT:
            raise MasterKeyError("unknown sealed-blob format")
        return self._aead.decrypt(blob[1:13], blob[13:], context.encode())
