"""Reads that decrypt straight out of the file's mapping (FileBackend.mapping, XtsLayer,
`_xts.Engine.decrypt_mapped`), and the SIGBUS guard that keeps a failed page from
killing the server.

SIGBUS is provoked the classic way: the file is truncated under a live mapping, so the
pages past the new end have nothing behind them. (A failing device does the same through
FUSE in tests/reliability/test_faults_storage.py.)
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from nbdserver.backend import FileBackend
from nbdserver.crypto import XtsLayer
from nbdserver.crypto.cipher import XtsSectorCipher, generate_dek

MiB = 1 << 20
S = 4096


class Unmapped(FileBackend):
    """The same file without a mapping: the pread path, as the reference."""

    def mapping(self):
        return None


def layers(path, size):
    key = generate_dek()
    mapped = XtsLayer(FileBackend(path, size=size), bytearray(key))
    plain = XtsLayer(Unmapped(path), bytearray(key))
    return mapped, plain


def test_mapped_reads_equal_pread_reads(tmp_path):
    path = tmp_path / "disk.img"
    mapped, ref = layers(path, 8 * MiB)
    try:
        data = os.urandom(3 * MiB)
        mapped.pwrite(data, MiB)                  # sectors 256..1023 written
        mapped.pwrite(os.urandom(512), 5 * MiB + 512)  # one partial sector
        for offset, n in ((0, 2 * MiB), (MiB, MiB), (MiB + 3 * S, 64 * S),
                          (4 * MiB - 64 * 1024, 8 * S * 4), (5 * MiB, 256 * 1024),
                          (MiB + 512, MiB - 1024), (6 * MiB, 2 * MiB)):
            a, b = bytearray(n), bytearray(n)
            mapped.pread(a, offset)
            ref.pread(b, offset)
            assert a == b, (offset, n)
        out = bytearray(MiB)
        mapped.pread(out, MiB)
        assert out == data[:MiB]
        mapped.pread(out, 7 * MiB)                # never written: a hole reads as zeros
        assert out == bytes(MiB)
        assert mapped.lower.mapping() is not None  # the mapped path really ran
    finally:
        mapped.close()
        ref.close()


def test_sigbus_on_the_mapping_is_eio_and_the_process_lives(tmp_path):
    path = tmp_path / "disk.img"
    layer = XtsLayer(FileBackend(path, size=8 * MiB), generate_dek())
    try:
        layer.pwrite(os.urandom(4 * MiB), 0)
        buf = bytearray(MiB)
        layer.pread(buf, 2 * MiB)                 # maps the file
        os.truncate(path, MiB)                    # pages past 1 MiB now fault: SIGBUS
        with pytest.raises(OSError) as failed:
            layer.pread(buf, 2 * MiB)
        assert failed.value.errno == errno.EIO
        assert "SIGBUS" in str(failed.value)
        # Everything still works: the engine (a fresh context), reads before the cut, and
        # the guard again on the next fault.
        layer.pread(buf, 0)
        with pytest.raises(OSError):
            layer.pread(buf, 6 * MiB)
        os.truncate(path, 8 * MiB)                # restored (the cut part reads as holes)
        layer.pread(buf, 6 * MiB)
        assert buf == bytes(MiB)
    finally:
        layer.close()


def test_decrypt_mapped_refuses_overlap_and_bad_sizes():
    c = XtsSectorCipher(generate_dek())
    try:
        buf = bytearray(4 * S)
        with pytest.raises(ValueError, match="overlap"):
            c.decrypt_mapped(memoryview(buf)[:2 * S], memoryview(buf)[S:3 * S], 0)
        with pytest.raises(ValueError, match="whole number"):
            c.decrypt_mapped(bytes(S), bytearray(S - 16), 0)
    finally:
        c.close()


CHILD = textwrap.dedent("""
    import mmap, os, sys, tempfile
    {prelude}
    from nbdserver.crypto.cipher import XtsSectorCipher, generate_dek
    c = XtsSectorCipher(generate_dek())
    c.decrypt_mapped(bytes(4096), bytearray(4096), 0)   # installs the guard
    fd, path = tempfile.mkstemp()
    os.ftruncate(fd, 1 << 20)
    m = mmap.mmap(fd, 1 << 20)
    os.ftruncate(fd, 0)
    print("touching", flush=True)
    m[4096 * 10]                                      # SIGBUS outside any guarded loop
    print("survived", flush=True)
""")


@pytest.mark.parametrize("prelude", ["", "import faulthandler; faulthandler.enable()"],
                         ids=["default-action", "faulthandler-before-us"])
def test_a_sigbus_outside_the_guard_still_kills(prelude):
    """The guard only catches faults inside decrypt_mapped: anywhere else SIGBUS does what
    it did before the handler was installed (here: kill, or faulthandler's report)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", CHILD.format(prelude=prelude)], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert "touching" in done.stdout and "survived" not in done.stdout, done
    assert done.returncode == -signal.SIGBUS, done
    if prelude:
        assert "Bus error" in done.stderr, done.stderr
