"""Disk images and the contents tests expect of them."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

DISK_SIZE = 64 << 20
RO_SIZE = 16 << 20


def dek_file(tmp_path) -> tuple[bytes, object]:
    """A random 64-byte DEK (its two halves differ, as XTS requires) and the 0600 file
    holding it, `tmp_path/dek.key`, for a server's `key=` export option."""
    key = os.urandom(64)
    while key[:32] == key[32:]:
        key = os.urandom(64)
    keyfile = tmp_path / "dek.key"
    keyfile.write_bytes(key)
    keyfile.chmod(0o600)
    return key, keyfile


def dmcrypt_sector(key: bytes, sector: int, plaintext: bytes) -> bytes:
    """aes-xts-plain64, sector_size=4096, iv_large_sectors, by `cryptography`: the
    ciphertext of one sector in the on-disk format (docs/format.md)."""
    enc = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little"))).encryptor()
    return enc.update(plaintext) + enc.finalize()


def write_ro_pattern(path, size: int) -> None:
    """Fill a file with 4 KiB blocks, each its block number (u32 LE) repeated."""
    with open(path, "wb") as f:
        for i in range(size // 4096):
            f.write(i.to_bytes(4, "little") * 1024)


def need_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            pytest.skip(f"{name} is not installed")


def ro_pattern(offset: int, length: int) -> bytes:
    """What the `ro` export holds at offset (4-byte block numbers repeated per 4 KiB)."""
    out = bytearray()
    pos = offset
    while pos < offset + length:
        block = pos // 4096
        end = min((block + 1) * 4096, offset + length)
        word = block.to_bytes(4, "little") * 1024
        out += word[pos % 4096: pos % 4096 + end - pos]
        pos = end
    return bytes(out)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def drop_cache(path) -> None:
    """Make a file cold: write back its pages, then drop them (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
