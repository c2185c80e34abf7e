"""`_uring.RingQueue.submit_write`: writes through the ring, reported by collect() like
reads; `done` runs exactly once for every write the queue took (success, error, or
dropped by close) and never for one it refused; an unaligned buffer for an O_DIRECT fd
is copied at submission. Real files and real errors from the kernel."""

from __future__ import annotations

import errno
import os

import pytest

from nbdserver.backend import aligned_buffer
from tests.unit.test_readq import collect_all, ring_error

pytestmark = pytest.mark.timeout(60)
S = 4096


@pytest.fixture
def ring():
    if ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    from nbdserver._uring import RingQueue
    q = RingQueue(4)
    yield q
    q.close()


@pytest.fixture
def direct_fd(tmp_path):
    fd = os.open(tmp_path / "w.img", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    os.ftruncate(fd, 1 << 20)
    yield fd
    os.close(fd)


def test_writes_land_and_done_runs_once_each(ring, direct_fd, tmp_path):
    calls: list[str] = []
    datas = {f"w{i}": os.urandom(S * (1 + i % 3)) for i in range(10)}  # more than the ring holds
    for i, (token, data) in enumerate(datas.items()):
        ring.submit_write(token, data, direct_fd, i * 4 * S, fua=i % 2 == 1, align=S,
                          done=lambda t=token: calls.append(t))
    done = collect_all(ring, len(datas))
    assert done == {t: len(d) for t, d in datas.items()}
    assert sorted(calls) == sorted(datas)
    with open(tmp_path / "w.img", "rb") as f:
        for i, data in enumerate(datas.values()):
            f.seek(i * 4 * S)
            assert f.read(len(data)) == data


def test_an_unaligned_buffer_is_copied_at_submission(ring, direct_fd, tmp_path):
    data = bytearray(os.urandom(S + 1))[1:]  # one byte off any alignment
    want = bytes(data)
    ring.submit_write("w", data, direct_fd, S, align=S)
    data[:] = bytes(S)  # the caller may reuse its buffer at once
    assert collect_all(ring, 1) == {"w": S}
    with open(tmp_path / "w.img", "rb") as f:
        f.seek(S)
        assert f.read(S) == want


def test_a_failed_write_reports_its_errno_and_still_runs_done(ring, tmp_path):
    path = tmp_path / "r.img"
    path.write_bytes(bytes(S))
    fd = os.open(path, os.O_RDONLY)
    calls = []
    try:
        ring.submit_write("w", aligned_buffer(S), fd, 0, done=lambda: calls.append(1))
        assert collect_all(ring, 1) == {"w": -errno.EBADF}
    finally:
        os.close(fd)
    assert calls == [1]


def test_a_refused_submission_never_runs_done(ring, direct_fd):
    calls = []
    with pytest.raises(ValueError, match="whole aligned blocks"):
        ring.submit_write("w", aligned_buffer(S), direct_fd, 100, align=S, done=lambda: calls.append(1))
    with pytest.raises(ValueError):
        ring.submit_write("w", b"", direct_fd, 0, done=lambda: calls.append(1))
    with pytest.raises(TypeError):
        ring.submit_write("w", aligned_buffer(S), direct_fd, 0, done=3)
    assert calls == [] and ring.in_flight == 0


def test_close_ends_every_write_and_runs_its_done(direct_fd):
    if ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    from nbdserver._uring import RingQueue
    q = RingQueue(1, lambda fn: None)  # deferred and never flushed: nothing enters the kernel
    calls = []
    for i in range(3):
        q.submit_write(i, aligned_buffer(S), direct_fd, i * S, align=S, done=lambda i=i: calls.append(i))
    results = dict(q.close())
    assert results[1] == results[2] == -errno.ECANCELED  # the backlog
    assert results[0] in (S, -errno.ECANCELED)  # in the ring: waited for
    assert sorted(calls) == [0, 1, 2]


def test_a_closed_file_backend_takes_no_ring_write(ring, tmp_path):
    """Its descriptor number may belong to another file by then."""
    from nbdserver.backend import FileBackend
    backend = FileBackend(tmp_path / "c.img", size=1 << 20, cache="none")
    assert backend.submit_write(ring, aligned_buffer(S), 0, "w")
    assert collect_all(ring, 1) == {"w": S}
    backend.close()
    assert not backend.submit_write(ring, aligned_buffer(S), 0, "x")
    assert ring.in_flight == 0
