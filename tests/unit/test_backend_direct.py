"""FileBackend with cache=none: O_DIRECT on the file, aligned I/O, and what it refuses.

Checked against a model of the disk (a bytearray) and against the same file read
through the page cache; O_DIRECT itself is read back from the descriptor's flags.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading

import pytest

from nbdserver.backend import FileBackend, FileSpec, aligned, aligned_buffer
from nbdserver.crypto import generate_dek, open_disk

pytestmark = pytest.mark.timeout(60)
S = 4096
MiB = 1 << 20


@pytest.fixture
def direct(tmp_path):
    b = FileBackend(tmp_path / "d.img", size=4 * MiB, cache="none")
    yield b
    b.close()


def test_the_file_is_open_with_o_direct_only_in_that_mode(tmp_path, direct):
    assert fcntl.fcntl(direct.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    assert direct.io_align == S and direct.mapping() is None
    buffered = FileBackend(tmp_path / "d.img")
    try:
        assert not fcntl.fcntl(buffered.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        assert buffered.io_align == 0
    finally:
        buffered.close()


def test_any_buffer_offset_and_length_match_the_model(tmp_path, direct):
    rng = random.Random(3)
    model = bytearray(4 * MiB)
    for i in range(400):
        n = rng.choice([1, 511, 512, S, S + 1, 3 * S, 64 * 1024, 200 * 1024])
        off = rng.randrange(0, len(model) - n)
        data = rng.randbytes(n)
        # bytes (read-only: always bounced), a heap bytearray, an aligned buffer
        src = [data, bytearray(data), None][i % 3]
        if src is None:
            src = aligned_buffer(n)
            src[:] = data
        direct.pwrite(src, off)
        model[off:off + n] = data
        n = rng.choice([1, 700, S, 5 * S, 128 * 1024])
        off = rng.randrange(0, len(model) - n)
        out = bytearray(n) if i % 2 else aligned_buffer(n)
        direct.pread(out, off)
        assert bytes(out) == model[off:off + n], (off, n)
    direct.flush()
    assert (tmp_path / "d.img").read_bytes() == model  # through the page cache: the same


def test_partial_blocks_written_at_once_lose_nothing(direct):
    """Byte-granular writers of one block: each read-modify-write holds the block's
    lock, so none writes back a block read before another's write landed."""
    rounds, writers = 50, 8
    barrier = threading.Barrier(writers)

    def write(i):
        for r in range(rounds):
            barrier.wait()
            direct.pwrite(bytes([r + 1]) * 100, S + i * 500 + 7)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    out = bytearray(2 * S)
    direct.pread(out, 0)
    for i in range(writers):
        assert out[S + i * 500 + 7:S + i * 500 + 107] == bytes([rounds]) * 100, f"writer {i}"


def test_nothing_runs_on_the_event_loop(direct):
    """No page cache to hit: a read or write with nowait would wait for the device."""
    with pytest.raises(BlockingIOError):
        direct.pread(bytearray(S), 0, nowait=True)
    with pytest.raises(BlockingIOError):
        direct.pwrite(bytearray(S), 0, nowait=True)
    with pytest.raises(BlockingIOError):
        direct.native_write(S, nowait=True)
    # Not a plain pwritev2 of the caller's buffer, which O_DIRECT would refuse unaligned.
    assert direct.native_write(S) is None


def test_refusals_say_why(tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(S + 1))
    with pytest.raises(OSError) as e:
        FileBackend(odd, cache="none")
    assert e.value.errno == errno.EINVAL and "multiple of 4096" in e.value.strerror
    with pytest.raises(ValueError, match="cache mode"):
        FileSpec(str(odd), cache="sometimes")
    with pytest.raises(ValueError, match="key"):
        open_disk(FileSpec(str(odd), encrypted=True))
    with pytest.raises(ValueError, match="key"):
        open_disk(FileSpec(str(odd)), generate_dek())


def test_aligned_buffers_are_aligned():
    for n in (1, S, 3 * S + 5, MiB):
        view = aligned_buffer(n)
        assert len(view) == n and aligned(view[:n - n % S] if n >= S else aligned_buffer(S), 0)
    assert not aligned(memoryview(bytes(S)), 0)  # read-only: its address is not ours to take
    assert not aligned(aligned_buffer(2 * S)[1:S + 1], 0)
