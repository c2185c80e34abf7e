"""AES-256-XTS sector cipher: the on-disk format of an encrypted disk, and its key.

Format (also docs/format.md)
----------------------------
A disk is a sequence of 4096-byte sectors. Sector `s` is encrypted with AES-256-XTS
(IEEE 1619), one data unit per sector, tweak = `s` as a 128-bit little-endian integer.
This is exactly dm-crypt's `aes-xts-plain64` with `sector_size=4096` and
`iv_large_sectors` (plain64 = the 64-bit little-endian sector number in a zeroed 16-byte
IV, and with iv_large_sectors the number counts 4096-byte units, not 512-byte ones).
The backing file holds the ciphertext of sector `s` at offset `s * 4096` and nothing
else: no header, no metadata, so the size of the disk is the size of the file.

Holes: a sector never written (or trimmed) is a hole in the sparse backing file, which
the lower layer reads as zeros. A real XTS ciphertext sector is all-zero with
probability 2^-32768, so an all-zero ciphertext sector is taken to be a hole and read as
zeros without decryption. Consequence for recovery with cryptsetup: dm-crypt decrypts
holes too, so a never-written sector reads as pseudo-random garbage there, not zeros.

The key (DEK) is 64 random bytes, two AES-256 keys (data key, tweak key), whose halves
must differ. It lives in a caller-owned `bytearray`, locked in RAM where the kernel
allows, and is wiped by `close()`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _xts

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer
    from typing_extensions import CapsuleType

SECTOR_SIZE = 4096
KEY_SIZE = 64  # AES-256-XTS: data key || tweak key


class InvalidKey(ValueError):
    """The DEK is not a usable AES-256-XTS key."""


def check_key(key: bytearray) -> None:
    """Refuse a key that cannot be wiped, has the wrong size, or has equal halves."""
    if not isinstance(key, bytearray):
        # bytes cannot be wiped in place, so a copy of the secret would outlive close().
        raise TypeError(f"the DEK must be a bytearray (wipeable), not {type(key).__name__}")
    if len(key) != KEY_SIZE:
        raise InvalidKey(f"an AES-256-XTS DEK is {KEY_SIZE} bytes, not {len(key)}")
    half = KEY_SIZE // 2
    # IEEE 1619-2018 5.1: key1 == key2 voids the mode's security. Compared in constant
    # time, through views: slicing the bytearray would leave unwiped copies of the key.
    with memoryview(key) as view:
        equal = hmac.compare_digest(view[:half], view[half:])
    if equal:
        raise InvalidKey("the two halves of an AES-256-XTS DEK must differ")


def generate_dek() -> bytearray:
    """A fresh 64-byte DEK from OpenSSL's CSPRNG, filled in place (no immutable copy)."""
    key = bytearray(KEY_SIZE)
    while True:
        _xts.random_into(key)
        try:
            check_key(key)
            return key
        except InvalidKey:  # equal halves: probability 2^-256, but never hand one out
            continue


class XtsSectorCipher:
    """Encrypts and decrypts runs of whole sectors in place or between buffers.

    Owns `key` from construction on: `close()` wipes it. Thread-safe (the native engine
    keeps one OpenSSL context per concurrent caller).
    """

    def __init__(self, key: bytearray, sector_size: int = SECTOR_SIZE) -> None:
        check_key(key)
        self._key = key
        self.sector_size = sector_size
        self._engine = _xts.Engine(key, sector_size)
        # The hot path calls the engine's own methods: one Python call less than a wrapper.
        # encrypt(src, dst, first_sector): whole sectors of `src` into `dst` (same
        # length; may be the same buffer).
        self.encrypt: Callable[[ReadableBuffer, WriteableBuffer, int], None] = self._engine.encrypt
        # encrypt_write(buf, fd, offset, first_sector, flags): encrypt `buf` in place, then
        # write all of it with pwritev2(fd, offset, flags), in one call that releases the
        # GIL once. OSError as the write fails.
        self.encrypt_write: Callable[[WriteableBuffer, int, int, int, int], None] = (
            self._engine.encrypt_write)
        # read_decrypt(buf, fd, offset, first_sector, flags): the read side, for the event
        # loop's page-cache reads: fill `buf` with preadv2(fd, offset, flags), zeros past
        # the end of the file, then decrypt it in place with holes. OSError as the read
        # fails (BlockingIOError for RWF_NOWAIT's EAGAIN). Returns the number of holes.
        self.read_decrypt: Callable[[WriteableBuffer, int, int, int, int], int] = (
            self._engine.read_decrypt)
        # Keep the DEK out of swap where permitted; failure (RLIMIT_MEMLOCK) is not fatal:
        # the key schedule inside OpenSSL is not locked either.
        self.key_locked = _xts.mlock(key, True)

    @property
    def closed(self) -> bool:
        return self._engine.closed

    def decrypt(self, src: ReadableBuffer, dst: WriteableBuffer, first_sector: int, *,
                holes: bool = False) -> int:
        """Decrypt whole sectors. With `holes`, an all-zero ciphertext sector is a
        never-written one and reads as zeros. Returns how many such sectors there were."""
        return self._engine.decrypt(src, dst, first_sector, holes)

    def decrypt_mapped(self, src: ReadableBuffer, dst: WriteableBuffer, first_sector: int) -> int:
        """`decrypt(src, dst, first_sector, holes=True)` for a `src` that is a file
        mapping (`BlockBackend.mapping()`): an I/O error while reading it raises
        OSError(EIO) instead of SIGBUS killing the process. `dst` must not overlap it."""
        return self._engine.decrypt_mapped(src, dst, first_sector)

    def read_transform(self) -> CapsuleType:
        """For the server's native read queue (`nbdserver._readq`): a capsule that runs
        `decrypt(buf, buf, first, holes=True)` on the queue's thread, without the GIL,
        after each read. It keeps the engine object alive, not the key (see close)."""
        return self._engine.read_transform()

    def write_transform(self) -> CapsuleType | None:
        """For the server's native small writes (`nbdserver._cachedio`): a capsule that
        runs `encrypt(buf, buf, first)` (the protocol of read_transform). None when this
        cipher has none (two layers)."""
        return self._engine.write_transform()

    def close(self) -> None:
        """Free the OpenSSL contexts (cleansing the key schedule) and wipe the DEK."""
        self._engine.close()
        _xts.wipe(self._key)
        if self.key_locked:
            # munlock is per page: a page shared with another still-open DEK loses its
            # lock too. Accepted: the cost is that page may be swapped, not a leak.
            _xts.mlock(self._key, False)
            self.key_locked = False
