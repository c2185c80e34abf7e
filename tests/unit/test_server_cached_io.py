"""The server's page-cache fast path (Connection._answer_cached over nbdserver/cachedio.py):
the READs and small WRITEs a connection receives are answered natively, counted in the
disk's statistics, and never while the disk is locked (revoked) or frozen (a snapshot).

The server runs in this process (tests/helpers/inproc.py) so that the test can count the
native calls and lock or freeze the disk between two requests."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from nbdserver import cachedio, server
from nbdserver.backend import FileBackend
from nbdserver.crypto import XtsLayer, generate_dek
from nbdserver.exports import Export, ExportCatalog
from nbdserver.protocol.constants import (
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_EIO,
    NBD_REQUEST_MAGIC,
)
from tests.helpers.images import drop_cache
from tests.helpers.inproc import ServerThread
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until

pytestmark = pytest.mark.timeout(60)
S = 4096
SIZE = 16 << 20


@pytest.fixture
def counted(monkeypatch):
    """Every native call the server makes, and what it answered: [(reads, writes)]."""
    calls: list[tuple[int, int]] = []
    real = cachedio.answer

    def answer(*args, **kw):
        done = real(*args, **kw)
        calls.append((done.reads, done.writes) if done is not None else (0, 0))
        return done

    monkeypatch.setattr(server.cachedio, "answer", answer)
    return calls


@pytest.fixture
def disk(tmp_path):
    backend = XtsLayer(FileBackend(tmp_path / "d.img", size=SIZE), generate_dek())
    backend.path = tmp_path / "d.img"
    export = Export("d", backend)
    catalog = ExportCatalog()
    catalog.add(export)
    with ServerThread(asyncio.new_event_loop, catalog) as srv:
        yield srv, export
    backend.close()


def request(cmd: int, offset: int, length: int, cookie: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload


def test_pipelined_reads_and_writes_are_answered_natively_and_counted(disk, counted):
    srv, export = disk
    a, b = os.urandom(S), os.urandom(8 * S)
    with RawClient.connected(srv.address, "d") as c:
        # The first WRITE of each stripe makes its lock on the usual path (the native
        # call declines a lock not made yet); after that they are answered natively.
        c.send(request(NBD_CMD_WRITE, 0, S, 1, a) + request(NBD_CMD_WRITE, 64 * S, 8 * S, 2, b))
        assert {c.simple_reply()[:2] for _ in range(2)} == {(0, 1), (0, 2)}
        before = sum(w for _, w in counted)
        chunk = (request(NBD_CMD_WRITE, S, S, 3, a) + request(NBD_CMD_WRITE, 72 * S, 8 * S, 4, b)
                 + request(NBD_CMD_READ, 0, 2 * S, 5) + request(NBD_CMD_READ, 64 * S, 16 * S, 6)
                 + request(NBD_CMD_FLUSH, 0, 0, 7) + request(NBD_CMD_READ, 72 * S, 8 * S, 8))
        c.send(chunk)
        assert c.simple_reply() == (0, 3, b"")
        assert c.simple_reply() == (0, 4, b"")
        assert c.simple_reply(2 * S) == (0, 5, a + a)
        assert c.simple_reply(16 * S) == (0, 6, b + b)
        # FLUSH and what follows it take the usual path, in order or not (the spec
        # allows either): each reply by its cookie.
        got = {}
        for _ in range(2):
            _, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
            got[cookie] = (error, c.recv_exact(8 * S) if cookie == 8 else b"")
        assert got == {7: (0, b""), 8: (0, b)}
    assert sum(w for _, w in counted) - before >= 2
    assert sum(r for r, _ in counted) >= 2
    stats = export.stats
    assert stats.requests[NBD_CMD_WRITE] == 4
    assert stats.bytes[NBD_CMD_WRITE] == 2 * (S + 8 * S)
    assert stats.requests[NBD_CMD_READ] == 3
    assert stats.bytes[NBD_CMD_READ] == 2 * S + 16 * S + 8 * S
    assert stats.requests[NBD_CMD_FLUSH] == 1


def test_a_locked_disk_is_never_served_natively(disk, counted):
    srv, export = disk
    data = os.urandom(S)
    with RawClient.connected(srv.address, "d") as c:
        c.send(request(NBD_CMD_WRITE, 0, S, 1, data))
        assert c.simple_reply() == (0, 1, b"")
        c.send(request(NBD_CMD_READ, 0, S, 2))
        assert c.simple_reply(S) == (0, 2, data)  # warm: native
        answered = sum(r for r, _ in counted)
        assert answered >= 1
        srv.call(lambda: export.lock("the key was revoked"))
        calls = len(counted)
        c.send(request(NBD_CMD_READ, 0, S, 3) + request(NBD_CMD_WRITE, 0, S, 4, data))
        assert c.simple_reply(S) == (NBD_EIO, 3, b"")
        assert c.simple_reply() == (NBD_EIO, 4, b"")
        assert len(counted) == calls  # not even asked


def test_requests_to_a_frozen_disk_wait_for_the_thaw(disk, counted):
    srv, export = disk
    data = os.urandom(S)
    thaw = asyncio.Event()

    async def snapshot():
        async with export.frozen():
            await thaw.wait()

    with RawClient.connected(srv.address, "d") as c:
        c.send(request(NBD_CMD_WRITE, 0, S, 1, data))
        assert c.simple_reply() == (0, 1, b"")
        held = asyncio.run_coroutine_threadsafe(snapshot(), srv.loop)
        wait_until(lambda: srv.call(lambda: export.is_frozen), 10, what="the disk frozen")
        calls = len(counted)
        c.send(request(NBD_CMD_WRITE, S, S, 2, data) + request(NBD_CMD_READ, 0, S, 3))
        wait_until(lambda: srv.call(lambda: len(export._parked)) == 2, 10,
                   what="both requests parked")
        assert len(counted) == calls
        srv.loop.call_soon_threadsafe(thaw.set)
        held.result(10)
        assert c.simple_reply() == (0, 2, b"")
        assert c.simple_reply(S) == (0, 3, data)


def test_a_read_the_fast_path_found_cold_is_not_tried_again_inline(disk, counted):
    """The native call's RWF_NOWAIT attempt missed: the usual path sends the READ to the
    read queue without a second attempt (each costs a system call on the loop, and may
    start read-ahead there)."""
    srv, export = disk
    backend = export.backend
    data = os.urandom(S)
    backend.pwrite(memoryview(bytearray(data)), 40 * S)
    backend.flush()
    drop_cache(backend.path)
    tried = []
    real = backend.pread

    def pread(buf, offset, *, nowait=False):
        tried.append(nowait)
        return real(buf, offset, nowait=nowait)

    backend.pread = pread  # the instance's: the class's channels are unchanged
    with RawClient.connected(srv.address, "d") as c:
        c.send(request(NBD_CMD_READ, 40 * S, S, 1))
        assert c.simple_reply(S) == (0, 1, data)
        assert True not in tried  # no inline RWF_NOWAIT attempt after the native one
        assert srv.call(lambda: next(iter(srv.server.connections)).nowait_misses) == 1
