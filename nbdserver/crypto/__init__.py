"""Encryption at rest: AES-256-XTS per 4096-byte sector (dm-crypt `aes-xts-plain64`,
`sector_size=4096`, `iv_large_sectors`); the format is described in `cipher.py` and
docs/format.md.

- `XtsSectorCipher`: the sector cipher over the native OpenSSL engine (`_xts.c`).
- `XtsLayer`: a `BlockBackend` that encrypts whatever backend it wraps.
- `generate_dek()`: a fresh 64-byte data encryption key, as a wipeable bytearray.
- `open_disk(spec, key)`: a disk's backend from its `backend.FileSpec` (path, size, cache
  mode, encrypted), the layer included when it is encrypted.
"""

from .cipher import KEY_SIZE, SECTOR_SIZE, InvalidKey, XtsSectorCipher, generate_dek
from .layer import XtsLayer, open_disk

__all__ = ["KEY_SIZE", "SECTOR_SIZE", "InvalidKey", "XtsLayer", "XtsSectorCipher", "generate_dek",
           "open_disk"]
