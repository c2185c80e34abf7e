"""Zeroing a secret (a DEK, a credential's text) in place, where both daemons keep them:
in a bytearray, or a memoryview of one, never in an immutable `bytes` that could not be
wiped. One slice assignment of the same length: the buffer is written, not replaced."""

from __future__ import annotations


def wipe(buf: bytearray | memoryview | None) -> None:
    if buf is not None:
        buf[:] = bytes(len(buf))
