"""The server's page-cache fast path (Connection._answer_cached over nbdserver/cachedio.py):
the READs and small WRITEs a connection receives are answered natively, counted in the
disk's statistics, and never while the disk is locked (revoked) or frozen (a snapshot).

The server runs in this process (tests/helpers/inproc.py) so that the test can count the
native calls and lock or freeze the disk between two requests."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from nbdserver import cachedio, server
from nbdserver.backend import FileBackend
from nbdserver.crypto import XtsLayer, generate_dek
from nbdserver.exports import Export, ExportCatalog
from nbdserver.platform.serving import DiskServing
from nbdserver.protocol.constants import (
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_EIO,
)
from tests.helpers.images import drop_cache
from tests.helpers.inproc import ServerThread
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until
from tests.helpers.sessions import record_sessions, request, session_running, start_session

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


def hold_frozen(srv, export):
    """A snapshot's freeze of `export`, held on the server's loop; the function returned
    thaws it and waits for the freeze to end."""
    thaw = asyncio.Event()

    async def snapshot():
        async with export.frozen():
            await thaw.wait()
    held = asyncio.run_coroutine_threadsafe(snapshot(), srv.loop)

    def release():
        srv.loop.call_soon_threadsafe(thaw.set)
        held.result(10)
    return release


def test_requests_to_a_frozen_disk_wait_for_the_thaw(disk, counted):
    srv, export = disk
    data = os.urandom(S)
    with RawClient.connected(srv.address, "d") as c:
        c.send(request(NBD_CMD_WRITE, 0, S, 1, data))
        assert c.simple_reply() == (0, 1, b"")
        thaw = hold_frozen(srv, export)
        wait_until(lambda: srv.call(lambda: export.is_frozen), 10, what="the disk frozen")
        calls = len(counted)
        c.send(request(NBD_CMD_WRITE, S, S, 2, data) + request(NBD_CMD_READ, 0, S, 3))
        wait_until(lambda: srv.call(lambda: len(export._parked)) == 2, 10,
                   what="both requests parked")
        assert len(counted) == calls
        thaw()
        assert c.simple_reply() == (0, 2, b"")
        assert c.simple_reply(S) == (0, 3, data)


def cold_block(backend):
    """Sector 40 written, then out of the page cache: its bytes, the `nowait` of every
    pread after, and the pread that records them (to put on the instance)."""
    data = os.urandom(S)
    backend.pwrite(memoryview(bytearray(data)), 40 * S)
    backend.flush()
    drop_cache(backend.path)
    tried: list[bool] = []
    real = backend.pread

    def pread(buf, offset, *, nowait=False):
        tried.append(nowait)
        return real(buf, offset, nowait=nowait)
    return data, tried, pread


def test_a_read_the_fast_path_found_cold_is_not_tried_again_inline(disk, counted):
    """The native call's RWF_NOWAIT attempt missed: the usual path sends the READ to the
    read queue without a second attempt (each costs a system call on the loop, and may
    start read-ahead there)."""
    srv, export = disk
    data, tried, pread = cold_block(export.backend)
    export.backend.pread = pread  # the instance's: the class's channels are unchanged
    with RawClient.connected(srv.address, "d") as c:
        c.send(request(NBD_CMD_READ, 40 * S, S, 1))
        assert c.simple_reply(S) == (0, 1, data)
        assert True not in tried  # no inline RWF_NOWAIT attempt after the native one
        assert srv.call(lambda: next(iter(srv.server.connections)).nowait_misses) == 1


# -- native sessions: a connection served on a thread of its own (Connection._start_session)

@pytest.fixture
def sessions(monkeypatch):
    """Every native session the server starts, and what it returned."""
    return record_sessions(monkeypatch)


def test_a_connection_at_queue_depth_one_is_served_by_a_session_and_counted(disk, sessions):
    srv, export = disk
    data = os.urandom(S)
    with RawClient.connected(srv.address, "d") as c:
        c.send(request(NBD_CMD_WRITE, 0, S, 1, data))  # makes the stripe lock
        assert c.simple_reply() == (0, 1, b"")
        for i in range(2, 40):  # one at a time; the first answered whole starts a session
            c.send(request(NBD_CMD_READ, 0, S, i))
            assert c.simple_reply(S) == (0, i, data)
            c.send(request(NBD_CMD_WRITE, S, S, 100 + i, data))
            assert c.simple_reply() == (0, 100 + i, b"")
        # Counted when the session returns: after SESSION_IDLE_MS without a request.
        wait_until(lambda: sessions and not session_running(srv), 10, what="the session ended")
    assert sum(s[3] for s in sessions) > 0 and sum(s[5] for s in sessions) > 0  # reads, writes
    stats = export.stats
    assert stats.requests[NBD_CMD_READ] == 38
    assert stats.requests[NBD_CMD_WRITE] == 39
    assert sum(h.count for h in stats.latency) >= 4  # every 16th timed, sessions too


@pytest.fixture
def long_sessions(monkeypatch):
    """Sessions that return only when stopped (or after 20 s): a test that stops one is
    not passed by a session that went idle meanwhile."""
    monkeypatch.setattr(server, "SESSION_IDLE_MS", 10_000)
    monkeypatch.setattr(server, "SESSION_MAX_MS", 20_000)


def test_a_disk_closed_without_a_lock_stops_its_running_session(disk, sessions, long_sessions):
    """Its lease lost to another server (DiskServing.unserve): a sealed backend goes in,
    unlocked, and the running session returns, so no later request reaches the file the
    other server may be writing (a session kept writing it for up to a second)."""
    srv, export = disk
    data = os.urandom(S)
    with RawClient.connected(srv.address, "d") as c:
        start_session(srv, c, data)
        serving = DiskServing(None, srv.server.catalog, None, None)  # type: ignore[arg-type]
        srv.call(lambda: serving.unserve("d", "the disk's lease was lost"))
        wait_until(lambda: sessions, 10, what="the session returned")
        assert sessions[-1][0] == cachedio.STOPPED
        c.send(request(NBD_CMD_WRITE, S, S, 3, os.urandom(S)))
        assert c.simple_reply() == (NBD_EIO, 3, b"")
        assert not export.locked  # unlocked: served again if this server gets the lease back


def test_a_lock_stops_a_running_session_at_once(disk, sessions, long_sessions):
    """Revocation: the session returns, the disk drains, later requests fail with EIO."""
    srv, export = disk
    data = os.urandom(S)
    with RawClient.connected(srv.address, "d") as c:
        start_session(srv, c, data)

        async def revoke():
            export.lock("the key was revoked")
            await asyncio.wait_for(export.drained(), 1.0)  # the revocation bound
        asyncio.run_coroutine_threadsafe(revoke(), srv.loop).result(10)
        assert [s[0] for s in sessions] == [cachedio.STOPPED]
        c.send(request(NBD_CMD_READ, 0, S, 3) + request(NBD_CMD_WRITE, 0, S, 4, data))
        assert c.simple_reply(S) == (NBD_EIO, 3, b"")
        assert c.simple_reply() == (NBD_EIO, 4, b"")


def test_a_freeze_stops_a_session_and_holds_what_follows(disk, sessions, long_sessions):
    srv, export = disk
    data = os.urandom(S)
    with RawClient.connected(srv.address, "d") as c:
        start_session(srv, c, data)
        thaw = hold_frozen(srv, export)
        wait_until(lambda: srv.call(lambda: export.is_frozen and export.inflight == 0), 10,
                   what="the disk frozen and drained")
        c.send(request(NBD_CMD_WRITE, S, S, 3, data))
        wait_until(lambda: srv.call(lambda: len(export._parked)) == 1, 10, what="the write parked")
        thaw()
        assert c.simple_reply() == (0, 3, b"")


def test_a_client_leaving_during_a_session_leaves_nothing_in_flight(disk, sessions):
    srv, export = disk
    with RawClient.connected(srv.address, "d") as c:
        start_session(srv, c, bytes(S))
    wait_until(lambda: srv.call(lambda: not srv.server.connections and export.inflight == 0
                                and srv.server.sessions == 0), 10, what="the connection gone")
    assert sessions[-1][0] == cachedio.CLOSED


def test_no_descriptor_for_a_session_leaves_the_connection_on_the_loop(disk, sessions, monkeypatch):
    srv, export = disk

    def no_eventfd(*args):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(server.os, "eventfd", no_eventfd)
    data = os.urandom(S)
    with RawClient.connected(srv.address, "d") as c:
        for i in range(1, 20):
            c.send(request(NBD_CMD_WRITE, 0, S, i, data))
            assert c.simple_reply() == (0, i, b"")
            c.send(request(NBD_CMD_READ, 0, S, 100 + i))
            assert c.simple_reply(S) == (0, 100 + i, data)
        assert not sessions
        assert srv.call(lambda: export.inflight == 0 and srv.server.sessions == 0)


def test_a_cold_read_a_session_stopped_at_is_not_tried_again_inline(disk, sessions):
    srv, export = disk
    data, tried, pread = cold_block(export.backend)
    with RawClient.connected(srv.address, "d") as c:
        start_session(srv, c, data)
        export.backend.pread = pread  # the instance's: the class's channels are unchanged
        c.send(request(NBD_CMD_READ, 40 * S, S, 3))
        assert c.simple_reply(S) == (0, 3, data)
        assert cachedio.Served(*sessions[-1])[::7] == (cachedio.DECLINED, 1)  # reason, missed
        assert True not in tried  # the read queue took it, without a second attempt
        assert srv.call(lambda: next(iter(srv.server.connections)).nowait_misses) == 1


def test_garbage_after_a_session_started_gets_the_usual_disconnect(disk, sessions):
    """What a session does not answer goes to the parser as received: a wrong magic in
    the middle of a session's stream closes that connection, and only that one."""
    srv, export = disk
    data = os.urandom(S)
    with RawClient.connected(srv.address, "d") as other, RawClient.connected(srv.address, "d") as c:
        start_session(srv, c, data)
        c.send(request(NBD_CMD_READ, 0, S, 3) + b"\x12\x34\x56\x78" + request(NBD_CMD_READ, 0, S, 4)[4:])
        assert c.simple_reply(S) == (0, 3, data)  # answered before the bad request
        assert c.closed_by_server()
        wait_until(lambda: srv.call(lambda: export.inflight == 0 and srv.server.sessions == 0), 10,
                   what="nothing left in flight")
        other.send(request(NBD_CMD_READ, 0, S, 5))
        assert other.simple_reply(S) == (0, 5, data)


def test_replies_a_session_could_not_send_are_charged_and_given_back(disk, sessions):
    """A client that stops reading: the session returns after its time with the replies
    the socket would not take; the loop sends them, charged to the buffer budget like
    any reply, and the budget is whole again once the client has read them."""
    srv, export = disk
    data = os.urandom(32 * S)
    export.backend.pwrite(memoryview(bytearray(data)), 0)
    with RawClient.connected(srv.address, "d") as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.send(request(NBD_CMD_READ, 0, S, 1))
        assert c.simple_reply(S) == (0, 1, data[:S])
        wait_until(lambda: session_running(srv), 10, what="a session")
        c.send(b"".join(request(NBD_CMD_READ, 0, 32 * S, 10 + i) for i in range(48)))
        wait_until(lambda: sessions, 10, what="the session's return")
        assert cachedio.Served(*sessions[0]).unsent  # handed to the loop
        for i in range(48):
            assert c.simple_reply(32 * S) == (0, 10 + i, data)
        # Invariant 1 of budget.py: what is used is what the holders hold.
        def held():
            conns = srv.server.connections
            return srv.server.budget.used, sum(c.budget_held for c in conns)
        used, holders = srv.call(held)
        assert used == holders and used >= 0
        c.send(request(NBD_CMD_READ, 0, S, 99))  # a write settles what was sent
        assert c.simple_reply(S) == (0, 99, data[:S])
        wait_until(lambda: srv.call(held)[0] < 48 * 32 * S // 4, 10, what="the replies given back")
