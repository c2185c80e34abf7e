"""Cold READs go to the server's native read queue (nbdserver/_readq.c on threads, or
nbdserver/_uring.c on io_uring: every test runs on both): they overlap, a failing one
fails alone, and a drain (revocation, snapshot, delete) waits for them.

The server runs in this process (tests/helpers/inproc.py) so that the test can see the
queue and hold back the loop's collection of finished reads at a precise moment."""

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
from nbdserver.protocol.constants import NBD_CMD_READ, NBD_EIO, NBD_REQUEST_MAGIC
from tests.helpers.images import drop_cache
from tests.helpers.inproc import ServerThread
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until
from tests.unit.test_readq import ring_error

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
S = 4096
SIZE = 64 * MiB
QUEUE_TYPES = {"threads": "ReadQueue", "uring": "RingQueue"}


@pytest.fixture(autouse=True, params=sorted(QUEUE_TYPES))
def read_queue_kind(request, monkeypatch):
    """The server (in this process) makes the queue NBDSERVER_READQ asks for."""
    if request.param == "uring" and ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    monkeypatch.setenv(readqueue.ENV, request.param)
    monkeypatch.setattr(readqueue, "_chosen", None)
    return request.param


def pipeline_reads(c: RawClient, offsets: list[int], length: int = S) -> dict:
    """Send every READ at once (the client's queue depth is len(offsets)), then take the
    replies in whatever order they come: {cookie: (error, data)}."""
    c.send(b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, i, off, length)
                    for i, off in enumerate(offsets)))
    replies = {}
    for _ in offsets:
        error, cookie, data = c.simple_reply(length)
        replies[cookie] = (error, data)
    return replies


class AlwaysCold(FileBackend):
    """Every page is a cache miss (RWF_NOWAIT would say EAGAIN), so every READ takes the
    read queue whatever the page cache holds. (A real RWF_NOWAIT miss also starts the
    page's read-ahead from the loop's thread, so on a fast disk the queue's threads may
    find the data already there and never overlap.) Reads at `bad` go to a directory's
    fd, which the kernel refuses with EISDIR."""

    def __init__(self, path, bad_dir, bad: int = -1, **kw):
        super().__init__(path, **kw)
        self.bad = bad
        self.bad_fd = os.open(bad_dir, os.O_RDONLY)

    def pread(self, buf, offset, *, nowait=False):
        if nowait:
            raise BlockingIOError("cold")
        super().pread(buf, offset)

    def submit_read(self, queue, buf, offset, token):
        if offset == self.bad:
            queue.submit(token, buf, self.bad_fd, offset)
            return True
        return super().submit_read(queue, buf, offset, token)

    def close(self):
        super().close()
        if self.bad_fd >= 0:
            os.close(self.bad_fd)
            self.bad_fd = -1


@pytest.mark.parametrize("cache", ["writeback", "none"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "xts"])
def test_cold_reads_overlap_on_the_read_queue(tmp_path, encrypted, cache, read_queue_kind):
    path = tmp_path / "cold.img"
    offsets = [i * (SIZE // 16) + (i % 3) * S for i in range(16)]
    if encrypted:
        key = generate_dek()
        writer = XtsLayer(FileBackend(path, size=SIZE), bytearray(key))
        plain = {off: os.urandom(S) for off in offsets[:-2]}  # the last two stay holes
        for off, data in plain.items():
            writer.pwrite(data, off)
        writer.close()
        backend = XtsLayer(AlwaysCold(path, tmp_path, cache=cache), key)
        expect = {off: plain.get(off, bytes(S)) for off in offsets}
    else:
        data = os.urandom(SIZE)
        path.write_bytes(data)
        backend = AlwaysCold(path, tmp_path, cache=cache)
        expect = {off: data[off:off + S] for off in offsets}
    # Really cold too: the queue's threads wait for the disk, so a queue that ran one
    # read at a time would show it.
    drop_cache(path)
    export = Export("d", backend)
    catalog = ExportCatalog()
    catalog.add(export)
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        replies = pipeline_reads(c, offsets)
        assert replies == {i: (0, expect[off]) for i, off in enumerate(offsets)}
        queue = srv.server.read_queue
        assert queue is not None and queue.in_flight == 0
        assert type(queue).__name__ == QUEUE_TYPES[read_queue_kind]
        # Before the queue, cold reads were serialized behind the GIL: one at a time.
        assert queue.peak > 1
        assert srv.call(lambda: export.inflight) == 0
    backend.close()


def test_a_failing_read_fails_alone(tmp_path):
    path = tmp_path / "d.img"
    data = os.urandom(4 * MiB)
    path.write_bytes(data)
    backend = AlwaysCold(path, tmp_path, bad=MiB)
    export = Export("d", backend)
    catalog = ExportCatalog()
    catalog.add(export)
    offsets = [0, MiB, 2 * MiB, 3 * MiB]
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        replies = pipeline_reads(c, offsets)
        assert replies[1] == (NBD_EIO, b"")  # EISDIR has no NBD code: EIO
        for i in (0, 2, 3):
            assert replies[i] == (0, data[offsets[i]:offsets[i] + S])
        assert srv.server.read_queue.peak >= 1
        # The connection goes on.
        assert pipeline_reads(c, [S]) == {0: (0, data[S:2 * S])}
    backend.close()


def test_a_drain_waits_until_the_read_is_collected(tmp_path):
    """Revocation locks the export, waits for `drained()`, then wipes the key and
    closes the file: a read finished on a queue thread but not yet answered still uses
    its buffer and (under XtsLayer) its engine, so it must still count as in flight."""
    path = tmp_path / "d.img"
    data = os.urandom(MiB)
    path.write_bytes(data)
    backend = AlwaysCold(path, tmp_path)
    export = Export("d", backend)
    catalog = ExportCatalog()
    catalog.add(export)
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        assert pipeline_reads(c, [0]) == {0: (0, data[:S])}  # the queue exists now
        queue = srv.server.read_queue
        srv.call(lambda: srv.loop.remove_reader(queue.fileno()))  # hold collection back
        c.request(NBD_CMD_READ, 2 * S, S, cookie=7)
        wait_until(lambda: queue.in_flight == 1, what="the read submitted")
        # The read is done on its thread: the queue's eventfd says so (select does not
        # consume it), and nobody collects it.
        assert select.select([queue.fileno()], [], [], 10)[0]
        drained = asyncio.run_coroutine_threadsafe(export.drained(), srv.loop)
        assert srv.call(lambda: export.inflight) == 1
        srv.call(lambda: None)  # a loop turn for drained() to start waiting
        assert not drained.done()
        srv.call(lambda: srv.loop.add_reader(queue.fileno(), srv.server._reads_done))
        drained.result(10)
        assert c.simple_reply(S) == (0, 7, data[2 * S:3 * S])
    backend.close()


class CountingCold(AlwaysCold):
    """AlwaysCold until `warm` is set; counts the inline (RWF_NOWAIT) attempts."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.attempts = 0
        self.warm = False

    def pread(self, buf, offset, *, nowait=False):
        if nowait:
            self.attempts += 1
            if not self.warm:
                raise BlockingIOError("cold")
        FileBackend.pread(self, buf, offset)


def test_a_connection_on_cold_data_stops_trying_inline_reads(tmp_path):
    """After NOWAIT_MISSES_MAX misses in a row only every PROBE_EVERY-th read tries the
    page cache first; the first hit of a probe brings every read back inline."""
    from nbdserver.server import NOWAIT_MISSES_MAX, PROBE_EVERY
    backend = CountingCold(tmp_path / "d.img", tmp_path, size=SIZE)
    catalog = ExportCatalog()
    catalog.add(Export("d", backend))
    n = 8 * PROBE_EVERY
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        for i in range(n):  # one at a time: each read's miss is counted before the next
            assert pipeline_reads(c, [i * S])[0][0] == 0
        cold_attempts = backend.attempts
        backend.warm = True
        for i in range(2 * PROBE_EVERY):
            assert pipeline_reads(c, [i * S])[0][0] == 0
        warm_attempts = backend.attempts - cold_attempts
    probes = len(range(PROBE_EVERY, n, PROBE_EVERY))
    assert cold_attempts == NOWAIT_MISSES_MAX + probes
    # Warm again: n is a multiple of PROBE_EVERY, so the first warm read is a probe; it
    # hits, and from then on every read is tried inline.
    assert warm_attempts == 2 * PROBE_EVERY
