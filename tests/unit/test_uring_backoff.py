"""A ring the kernel keeps refusing (io_uring_enter fails) with nothing in it: the
queue retries through `later` (the loop's call_later), backing off from 1 ms to 128 ms,
instead of making its eventfd readable so the loop calls it again at once, every turn.

The kernel is made to refuse for real: the ring's descriptor number is pointed at
another file (dup2), so io_uring_enter gets a descriptor that is no ring. The queue is
then broken for good, and close() says so."""

from __future__ import annotations

import os
import select

import pytest

from tests.unit.test_readq import ring_error

pytestmark = pytest.mark.timeout(60)
S = 4096


def ring_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[io_uring]":
                fds.add(int(name))
        except OSError:
            pass
    return fds


@pytest.fixture
def refused_ring(tmp_path):
    """A deferred ring whose descriptor no longer is one, the calls it scheduled, and a
    file to read."""
    if ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    from nbdserver._uring import RingQueue
    soon, later = [], []
    before = ring_fds()
    q = RingQueue(4, soon.append, later=lambda delay, fn: later.append((delay, fn)))
    (fd,) = ring_fds() - before
    other = os.open(os.devnull, os.O_RDONLY)
    os.dup2(other, fd)
    os.close(other)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(S))
    yield q, soon, later, path


def test_a_refused_ring_backs_off_instead_of_spinning(refused_ring):
    q, soon, later, path = refused_ring
    fd = os.open(path, os.O_RDONLY)
    try:
        q.submit("r", bytearray(S), fd, 0)
        assert soon == [q.flush] and later == []
        soon.pop()()  # the loop's turn ends: the kernel refuses
        # Not the eventfd (the loop would call again at once), but a retry in 1 ms.
        assert not select.select([q.fileno()], [], [], 0)[0]
        assert [d for d, _ in later] == [0.001]
        delays = []
        for _ in range(10):  # each refused retry waits twice as long, up to 128 ms
            _, retry = later.pop()
            retry()
            delays.append(later[-1][0])
        assert delays == [0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.128, 0.128, 0.128]
        assert q.retry_delay == 0.128
        # More reads while refused schedule no second timer.
        q.submit("r2", bytearray(S), fd, S)
        soon.pop()()
        assert len(later) == 1
        with pytest.raises(OSError):  # the reads in it can be neither waited for nor freed
            q.close()
    finally:
        os.close(fd)
