"""SealedBackend (nbdserver/platform/sealed.py), a locked disk's stand-in: every member of
the interface either refuses with EIO or declines, a member added to BlockBackend included."""

from __future__ import annotations

import errno
import inspect

import pytest

from nbdserver.backend import BlockBackend
from nbdserver.platform.sealed import SealedBackend

# What a sealed disk still answers: it has a size, and closing it is a no-op.
HARMLESS = {"size", "capabilities", "io_align", "close"}


def members() -> list[str]:
    return [n for n in dir(BlockBackend) if not n.startswith("_") and n not in HARMLESS]


@pytest.mark.parametrize("name", members())
def test_every_data_member_refuses_or_declines(name):
    sealed = SealedBackend(1 << 20)
    member = inspect.getattr_static(BlockBackend, name)
    assert not isinstance(member, property), f"{name}: a new property needs a decision here"
    sig = inspect.signature(member)
    args = [bytearray(4096) if p.name in ("buf", "data") else 0
            for p in list(sig.parameters.values())[1:] if p.kind is not p.KEYWORD_ONLY]
    try:
        answer = getattr(sealed, name)(*args)
    except OSError as e:
        assert e.errno in (errno.EIO, errno.ENOTSUP), (name, e)
    else:
        assert answer in (None, False), (name, answer)  # declined: the caller uses pread/pwrite
