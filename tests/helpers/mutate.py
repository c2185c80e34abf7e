"""Mutations of a valid byte stream, as the fuzz tests send them: bit flips, byte
changes, insertions, deletions, truncation, and 4-byte fields (lengths, counts)
overwritten with values at the edges."""

from __future__ import annotations

import random
import struct


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        how = rng.randrange(6)
        pos = rng.randrange(len(b)) if b else 0
        if how == 0 and b:
            b[pos] ^= 1 << rng.randrange(8)
        elif how == 1 and b:
            b[pos] = rng.choice([0, 0xff, 0x7f, 0x80, rng.randrange(256)])
        elif how == 2:
            b[pos:pos] = rng.randbytes(rng.randint(1, 32))
        elif how == 3 and b:
            del b[pos:pos + rng.randint(1, 32)]
        elif how == 4:
            del b[pos:]
        else:  # overwrite a 4-byte field, lengths and counts included
            b[pos:pos + 4] = struct.pack(">I", rng.choice([0, 1, 0xffffffff, 1 << 25, 1 << 31,
                                                           rng.randrange(1 << 32)]))
    return bytes(b)
