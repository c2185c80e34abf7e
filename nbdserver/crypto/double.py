"""Double encryption at rest: every sector encrypted twice, under two independent DEKs.

Format (also docs/format.md, "Double encryption")
-------------------------------------------------
A disk of an `EncryptionAtRestWithPlatformAndCustomerKeys` set has two DEKs: the
platform's (wrapped by the platform key) and the customer's (wrapped by the set's key in
the customer's vault). Sector `s` holds

    XTS(customer DEK, tweak s, XTS(platform DEK, tweak s, plaintext))

both layers exactly the single layer of `cipher.py` (AES-256-XTS, 4096-byte data units,
tweak = `s`). That is two stacked dm-crypt `aes-xts-plain64` devices with
`sector_size=4096` and `iv_large_sectors`: the file opened with the customer's DEK gives
a device that, opened with the platform's DEK, gives the plaintext.

Why the customer's layer is the outer one (the one the file shows): it is the layer a
revocation takes away, so the bytes at rest are, first of all, the customer's ciphertext;
the platform layer beneath is the defence in depth against a flaw or a leak in the
customer's key handling. Either order is equally strong; this one keeps the file of a
double disk, seen through its customer layer, exactly what a platform-managed disk's file
is (XTS under the platform DEK).

Holes read as zeros as in `cipher.py`: an all-zero sector of the file is a hole, the
outer decryption turns it into zeros, and the inner one reads those zeros as a hole too.

The two DEKs travel as one 128-byte `bytearray`, the platform's first (`DOUBLE_KEY_SIZE`):
one buffer to hand to an I/O worker, to lock in RAM and to wipe.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from . import _xts
from .cipher import KEY_SIZE, SECTOR_SIZE, InvalidKey, XtsSectorCipher, check_key

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer
    from typing_extensions import CapsuleType

DOUBLE_KEY_SIZE = 2 * KEY_SIZE  # platform DEK || customer DEK


def check_double_key(key: bytearray) -> None:
    """Refuse a pair that is not two usable, different AES-256-XTS keys."""
    if not isinstance(key, bytearray):
        raise TypeError(f"the DEKs must be a bytearray (wipeable), not {type(key).__name__}")
    if len(key) != DOUBLE_KEY_SIZE:
        raise InvalidKey(f"two AES-256-XTS DEKs are {DOUBLE_KEY_SIZE} bytes, not {len(key)}")
    with memoryview(key) as view:
        for half in (view[:KEY_SIZE], view[KEY_SIZE:]):
            # check_key's own test, on a view: a sliced bytearray would copy the secret.
            if hmac.compare_digest(half[:KEY_SIZE // 2], half[KEY_SIZE // 2:]):
                raise InvalidKey("the two halves of an AES-256-XTS DEK must differ")
        # One key twice would make the layers one key's: not two independent ones.
        if hmac.compare_digest(view[:KEY_SIZE], view[KEY_SIZE:]):
            raise InvalidKey("the platform and customer DEKs must differ")


def join_keys(platform_dek: bytearray, customer_dek: bytearray) -> bytearray:
    """The pair as one buffer; both inputs are wiped (the caller owns only the result),
    also when one is refused: the other is as secret, and no caller is left holding it."""
    try:
        check_key(platform_dek)
        check_key(customer_dek)
        key = bytearray(DOUBLE_KEY_SIZE)
        key[:KEY_SIZE] = platform_dek
        key[KEY_SIZE:] = customer_dek
    finally:
        for dek in (platform_dek, customer_dek):
            if isinstance(dek, bytearray):  # bytes cannot be wiped (check_key refuses them)
                _xts.wipe(dek)
    return key


class DoubleXtsCipher(XtsSectorCipher):
    """`XtsSectorCipher` with two engines: encrypt = inner (platform) then outer
    (customer), decrypt the reverse. Owns `key` (128 bytes); `close()` wipes it.

    The native read queue runs both layers' decryption in one transform
    (`_xts.chain_read_transform`), so cold reads of a double disk stay native too; the
    page-cache fast path runs both layers' encryption in one (`chain_write_transform`)."""

    def __init__(self, key: bytearray, sector_size: int = SECTOR_SIZE) -> None:
        check_double_key(key)
        self._key = key
        self.sector_size = sector_size
        with memoryview(key) as view:
            self._inner = _xts.Engine(view[:KEY_SIZE], sector_size)
            try:
                self._outer = _xts.Engine(view[KEY_SIZE:], sector_size)
            except BaseException:
                self._inner.close()
                raise
        self.encrypt = self._encrypt_both
        self.encrypt_write = self._encrypt_write_both
        self.read_decrypt = self._read_decrypt_both
        self.key_locked = _xts.mlock(key, True)

    @property
    def closed(self) -> bool:
        return self._outer.closed

    def _encrypt_both(self, src: ReadableBuffer, dst: WriteableBuffer, first_sector: int) -> None:
        self._inner.encrypt(src, dst, first_sector)
        self._outer.encrypt(dst, dst, first_sector)

    def _encrypt_write_both(self, buf: WriteableBuffer, fd: int, offset: int, first_sector: int,
                            flags: int) -> None:
        self._inner.encrypt(buf, buf, first_sector)
        self._outer.encrypt_write(buf, fd, offset, first_sector, flags)

    def _read_decrypt_both(self, buf: WriteableBuffer, fd: int, offset: int, first_sector: int,
                           flags: int) -> int:
        found = self._outer.read_decrypt(buf, fd, offset, first_sector, flags)
        self._inner.decrypt(buf, buf, first_sector, True)
        return found

    def decrypt(self, src: ReadableBuffer, dst: WriteableBuffer, first_sector: int, *,
                holes: bool = False) -> int:
        found = self._outer.decrypt(src, dst, first_sector, holes)
        # With holes, the outer layer made its holes zeros, which the inner one reads
        # as holes too: a never-written sector reads as zeros through both.
        self._inner.decrypt(dst, dst, first_sector, holes)
        return found

    def decrypt_mapped(self, src: ReadableBuffer, dst: WriteableBuffer, first_sector: int) -> int:
        found = self._outer.decrypt_mapped(src, dst, first_sector)
        self._inner.decrypt(dst, dst, first_sector, True)
        return found

    def read_transform(self) -> CapsuleType:
        return _xts.chain_read_transform(self._outer, self._inner)

    def write_transform(self) -> CapsuleType | None:
        return _xts.chain_write_transform(self._outer, self._inner)

    def close(self) -> None:
        self._inner.close()
        self._outer.close()
        _xts.wipe(self._key)
        if self.key_locked:
            _xts.mlock(self._key, False)
            self.key_locked = False
