"""cache=none WRITEs on the server's io_uring queue (`_uring.RingQueue.submit_write`,
`BlockBackend.submit_write`): an O_DIRECT write of whole sectors goes on the ring from
the event loop, not through the worker pool; its completion is answered on the loop; a
failing one fails alone; a drain waits for it; and a read-modify-write of its sectors
waits until it is done. With the thread read queue the same writes go to workers.

The server runs in this process (tests/helpers/inproc.py) so that the test can see the
queue and hold back the loop's collection of completions at a precise moment."""

from __future__ import annotations

import asyncio
import os
import select
import struct

import pytest

from nbdserver import readqueue
from nbdserver.backend import FileBackend
from nbdserver.crypto import XtsLayer, generate_dek
from nbdserver.exports import Export, ExportCatalog
from nbdserver.protocol.constants import (
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_REQUEST_MAGIC,
)
from tests.helpers.inproc import ServerThread
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until
from tests.unit.test_readq import ring_error

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
S = 4096
SIZE = 16 * MiB


def use_queue(monkeypatch, kind: str) -> None:
    if kind == "uring" and ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    monkeypatch.setenv(readqueue.ENV, kind)
    monkeypatch.setattr(readqueue, "_chosen", None)


def open_disk(path, encrypted: bool, cache: str = "none"):
    lower = FileBackend(path, size=SIZE, cache=cache)
    return XtsLayer(lower, generate_dek()) if encrypted else lower


class CountingPool:
    """The server's worker pool, counting what it is given."""

    def __init__(self, pool):
        self.pool, self.jobs = pool, 0

    def submit(self, fn, *args, **kw):
        self.jobs += 1
        return self.pool.submit(fn, *args, **kw)

    def shutdown(self, *a, **kw):
        return self.pool.shutdown(*a, **kw)


def pipeline_writes(c: RawClient, writes: list[tuple[int, bytes]], flags: int = 0) -> dict:
    """Send every WRITE at once, then take the replies as they come: {cookie: error}."""
    c.send(b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, NBD_CMD_WRITE, i, off,
                                len(data)) + data for i, (off, data) in enumerate(writes)))
    replies = {}
    for _ in writes:
        error, cookie, _ = c.simple_reply()
        replies[cookie] = error
    return replies


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "xts"])
@pytest.mark.parametrize("fua", [False, True], ids=["", "fua"])
def test_cache_none_writes_go_on_the_ring_not_the_pool(tmp_path, monkeypatch, encrypted, fua):
    use_queue(monkeypatch, "uring")
    backend = open_disk(tmp_path / "w.img", encrypted)
    catalog = ExportCatalog()
    catalog.add(Export("d", backend))
    writes = [(i * (SIZE // 16) + (i % 3) * S, os.urandom(S * (1 + i % 2))) for i in range(16)]
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        pool = srv.server.pool = CountingPool(srv.server.pool)
        replies = pipeline_writes(c, writes, NBD_CMD_FLAG_FUA if fua else 0)
        assert replies == dict.fromkeys(range(16), 0)
        assert pool.jobs == 0  # not one write took a worker
        assert srv.server.read_queue.peak >= 1
        # FLUSH is still fdatasync on a worker, after the writes it covers were answered.
        c.request(NBD_CMD_FLUSH, cookie=99)
        assert c.simple_reply() == (0, 99, b"")
        assert pool.jobs == 1
        for off, data in writes:  # through the server: decrypted as written
            c.request(NBD_CMD_READ, off, len(data), cookie=off)
            assert c.simple_reply(len(data)) == (0, off, data)
    for off, data in writes:  # and through the disk itself
        buf = bytearray(len(data))
        backend.pread(memoryview(buf), off)
        assert bytes(buf) == data
    backend.close()


def test_with_the_thread_queue_the_writes_take_workers(tmp_path, monkeypatch):
    use_queue(monkeypatch, "threads")
    backend = open_disk(tmp_path / "w.img", True)
    catalog = ExportCatalog()
    catalog.add(Export("d", backend))
    writes = [(i * S, os.urandom(S)) for i in range(8)]
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        pool = srv.server.pool = CountingPool(srv.server.pool)
        assert pipeline_writes(c, writes) == dict.fromkeys(range(8), 0)
        assert pool.jobs == 8
    for off, data in writes:
        buf = bytearray(S)
        backend.pread(memoryview(buf), off)
        assert bytes(buf) == data
    backend.close()


class FailingAt(FileBackend):
    """Ring writes at `bad` go to a read-only fd, which the kernel refuses (EBADF)."""

    def __init__(self, path, bad: int, **kw):
        super().__init__(path, **kw)
        self.bad = bad
        self.bad_fd = os.open(path, os.O_RDONLY)

    def submit_write(self, queue, data, offset, token, *, fua=False, done=None):
        if offset == self.bad:
            queue.submit_write(token, data, self.bad_fd, offset, done=done)
            return True
        return super().submit_write(queue, data, offset, token, fua=fua, done=done)

    def close(self):
        super().close()
        if self.bad_fd >= 0:
            os.close(self.bad_fd)
            self.bad_fd = -1


def test_a_failing_write_fails_alone(tmp_path, monkeypatch):
    use_queue(monkeypatch, "uring")
    backend = FailingAt(tmp_path / "f.img", 3 * S, size=SIZE, cache="none")
    catalog = ExportCatalog()
    catalog.add(Export("d", backend))
    writes = [(i * S, os.urandom(S)) for i in range(6)]
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        replies = pipeline_writes(c, writes)
        assert replies[3] != 0
        assert {k: v for k, v in replies.items() if k != 3} == dict.fromkeys([0, 1, 2, 4, 5], 0)
        # The connection goes on, and the failed write's block locks were given back
        # (else this write of the same blocks would wait for them on a worker forever).
        backend.bad = -1
        assert pipeline_writes(c, [(3 * S, writes[3][1])]) == {0: 0}
        c.request(NBD_CMD_READ, 3 * S, S, cookie=5)
        assert c.simple_reply(S) == (0, 5, writes[3][1])
    backend.close()


def test_a_drain_and_a_read_modify_write_wait_for_the_ring_write(tmp_path, monkeypatch):
    """Revocation waits for `drained()` before it wipes the key: a write in the ring
    counts as in flight until collected. And a sub-sector write of the same sector (a
    read-modify-write on a worker) waits for the stripe lock the ring write holds, so
    the ring write's sector is not read before it lands."""
    use_queue(monkeypatch, "uring")
    backend = open_disk(tmp_path / "d.img", True)
    export = Export("d", backend)
    catalog = ExportCatalog()
    catalog.add(export)
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        assert pipeline_writes(c, [(0, os.urandom(S))]) == {0: 0}  # the queue exists now
        queue = srv.server.read_queue
        srv.call(lambda: srv.loop.remove_reader(queue.fileno()))  # hold collection back
        first = os.urandom(S)
        c.request(NBD_CMD_WRITE, 2 * S, S, cookie=7, payload=first)
        wait_until(lambda: queue.in_flight == 1, what="the write submitted")
        assert select.select([queue.fileno()], [], [], 10)[0]  # done in the kernel
        c.request(NBD_CMD_WRITE, 2 * S + 100, 10, cookie=8, payload=b"x" * 10)
        drained = asyncio.run_coroutine_threadsafe(export.drained(), srv.loop)
        srv.call(lambda: None)  # a loop turn for drained() to start waiting
        assert not drained.done()
        # The ring write and the RMW (on a worker, waiting for the stripe's lock, which
        # the ring write holds until it is collected).
        wait_until(lambda: srv.call(lambda: export.inflight) == 2, what="the RMW started")
        stripe = backend._locks.single(2, 3)
        assert stripe.locked() and not drained.done()
        srv.call(lambda: srv.loop.add_reader(queue.fileno(), srv.server._reads_done))
        drained.result(10)
        assert not stripe.locked()
        assert {c.simple_reply()[1], c.simple_reply()[1]} == {7, 8}
        c.request(NBD_CMD_READ, 2 * S, S, cookie=9)
        want = first[:100] + b"x" * 10 + first[110:]
        assert c.simple_reply(S) == (0, 9, want)
    backend.close()
