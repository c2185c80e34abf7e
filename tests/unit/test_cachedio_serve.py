"""A connection served natively on a thread of its own (cachedio.serve_prepared over
_cachedio.c's serve): the requests answer() would answer, received and answered one chunk
after another without the GIL, and a prompt return, with every byte accounted for, at the
first request it would not answer, when idle, when stopped, and when the client leaves."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from concurrent.futures import Future, wait

import pytest

from nbdserver import cachedio
from nbdserver.backend import FileBackend
from nbdserver.crypto import SECTOR_SIZE as S
from nbdserver.crypto import XtsLayer
from nbdserver.protocol.constants import NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE
from nbdserver.protocol.transmission import read_reply_head, simple_reply
from nbdserver.server import INLINE_READ_MAX
from tests.helpers.images import dmcrypt_sector, drop_cache
from tests.unit.test_cachedio import SIZE, req
from tests.unit.test_readq import layer_key

pytestmark = pytest.mark.timeout(60)
LONG = 60_000  # ms: a session the test ends itself


@pytest.fixture
def single(tmp_path):
    key = layer_key("single")
    keep = bytes(key)
    layer = XtsLayer(FileBackend(tmp_path / "disk.img", size=SIZE), key)
    for i in range(SIZE // (16 * S)):
        layer._locks.stripe(i)  # made on first use by the usual path
    yield layer, keep, tmp_path / "disk.img"
    layer.close()


class Session:
    """serve() on a thread, over one end of a socketpair; the test is the client."""

    def __init__(self, layer, *, idle_ms=LONG, max_ms=LONG, structured=False, read_only=False,
                 hold: threading.Event | None = None):
        self.client, server = socket.socketpair()
        server.setblocking(False)
        self.client.settimeout(30)
        self.server = server
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stop_flag = bytearray(1)
        serve = cachedio.serve_prepared(layer, size=SIZE, min_block=1, structured=structured,
                                        read_only=read_only, max_read=INLINE_READ_MAX)
        assert serve is not None
        self.result: Future = Future()

        def run():
            try:
                self.result.set_result(serve(server.fileno(), self.stop_fd, self.stop_flag, idle_ms,
                                             max_ms))
            except BaseException as e:  # noqa: BLE001 - the test reads it
                self.result.set_exception(e)
            if hold is not None:  # the thread lives on until the test lets it go
                hold.wait(30)
        self.thread = threading.Thread(target=run)
        self.thread.start()

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            got = self.client.recv(n - len(out))
            assert got, "the session closed the connection"
            out += got
        return bytes(out)

    def stop(self) -> cachedio.Served:
        self.stop_flag[0] = 1
        os.eventfd_write(self.stop_fd, 1)
        return self.done()

    def done(self) -> cachedio.Served:
        served = self.result.result(10)
        self.thread.join(10)
        return served

    def close(self):
        self.client.close()
        self.server.close()
        os.close(self.stop_fd)


@pytest.fixture
def sessions():
    made: list[Session] = []
    yield made
    for s in made:
        if not s.result.done():
            s.stop()
        s.close()


@pytest.mark.parametrize("structured", [False, True])
def test_requests_sent_one_by_one_are_answered_as_answer_would(single, sessions, structured):
    layer, key, path = single
    s = Session(layer, structured=structured)
    sessions.append(s)
    blocks = [os.urandom(S) for _ in range(8)]
    for i, block in enumerate(blocks):  # queue depth 1: each reply before the next request
        s.client.sendall(req(NBD_CMD_WRITE, (20 * i) * S, S, cookie=i, payload=block))
        assert s.recv_exact(16) == simple_reply(i)
    for i, block in enumerate(blocks):
        s.client.sendall(req(NBD_CMD_READ, (20 * i) * S, S, cookie=100 + i))
        head = read_reply_head(100 + i, (20 * i) * S, S, structured=structured)
        assert s.recv_exact(len(head) + S) == head + block
    served = s.stop()
    assert served.reason == cachedio.STOPPED
    assert (served.reads, served.read_bytes, served.writes, served.write_bytes) == (8, 8 * S, 8, 8 * S)
    assert served.leftover == b"" and served.unsent == b""
    stored = path.read_bytes()
    for i, block in enumerate(blocks):
        assert stored[20 * i * S:(20 * i + 1) * S] == dmcrypt_sector(key, 20 * i, block)


def test_a_request_pipelined_in_pieces_is_answered_once_whole(single, sessions):
    layer, _, _ = single
    s = Session(layer)
    sessions.append(s)
    data = os.urandom(4 * S)
    chunk = req(NBD_CMD_WRITE, 0, 4 * S, cookie=1, payload=data) + req(NBD_CMD_READ, 0, 4 * S, cookie=2)
    for piece in (chunk[:5], chunk[5:40], chunk[40:S], chunk[S:]):
        s.client.sendall(piece)
    assert s.recv_exact(16 + 16 + 4 * S) == simple_reply(1) + simple_reply(2) + data
    assert s.stop().leftover == b""


def test_it_returns_at_a_request_it_does_not_answer_with_the_rest_unread(single, sessions):
    layer, _, _ = single
    s = Session(layer)
    sessions.append(s)
    data = os.urandom(S)
    tail = req(NBD_CMD_FLUSH, 0, 0, cookie=2) + req(NBD_CMD_READ, 0, S, cookie=3)
    s.client.sendall(req(NBD_CMD_WRITE, 0, S, cookie=1, payload=data) + tail)
    served = s.done()
    assert served.reason == cachedio.DECLINED
    assert served.leftover == tail  # the loop's parser takes it from here
    assert s.recv_exact(16) == simple_reply(1)
    assert (served.writes, served.reads) == (1, 0)


def test_a_read_the_page_cache_lacks_is_left_for_the_read_queue(single, sessions):
    layer, _, path = single
    layer.pwrite(memoryview(bytearray(os.urandom(S))), 64 * S)
    layer.flush()
    drop_cache(path)
    s = Session(layer)
    sessions.append(s)
    cold = req(NBD_CMD_READ, 64 * S, S, cookie=1)
    s.client.sendall(cold)
    served = s.done()
    assert (served.reason, served.leftover, served.missed) == (cachedio.DECLINED, cold, 1)


def test_a_busy_stripe_lock_leaves_the_write_to_the_loop(single, sessions):
    layer, _, _ = single
    lock = layer._locks.stripe(0)
    assert lock.acquire(False)  # another request of the disk holds it
    try:
        s = Session(layer)
        sessions.append(s)
        write = req(NBD_CMD_WRITE, S, S, cookie=1, payload=os.urandom(S))
        s.client.sendall(write)
        served = s.done()
    finally:
        lock.release()
    assert (served.reason, served.leftover, served.writes) == (cachedio.DECLINED, write, 0)


def test_an_idle_session_returns_with_a_partial_request_kept(single, sessions):
    layer, _, _ = single
    s = Session(layer, idle_ms=50)
    sessions.append(s)
    partial = req(NBD_CMD_READ, 0, S, cookie=1)[:20]
    s.client.sendall(partial)
    served = s.done()
    assert (served.reason, served.leftover) == (cachedio.IDLE, partial)


def test_signals_do_not_keep_an_idle_session_past_its_time(single, sessions):
    """A signal interrupts the wait for a request; the wait goes on for what is left of
    its time, not for all of it again, so signals every 5 ms cannot keep a 50 ms idle
    session waiting (they did: it never returned)."""
    layer, _, _ = single
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    hold = threading.Event()
    try:
        s = Session(layer, idle_ms=50, hold=hold)
        sessions.append(s)
        deadline = time.monotonic() + 5
        # The thread is alive until `hold` is set, so it can be signalled until then.
        while not s.result.done() and time.monotonic() < deadline:
            signal.pthread_kill(s.thread.ident, signal.SIGUSR1)
            wait([s.result], timeout=0.005)  # a signal every 5 ms until it returns
        assert s.result.done(), "still waiting after 5 s of signals"
    finally:
        hold.set()
        signal.signal(signal.SIGUSR1, previous)
    assert s.done().reason == cachedio.IDLE


def test_a_busy_session_returns_after_its_longest_time(single, sessions):
    layer, _, _ = single
    s = Session(layer, max_ms=200)
    sessions.append(s)
    n = 0
    last = b""
    while not s.result.done():  # queue depth 1 until it returns
        last = req(NBD_CMD_READ, 0, S, cookie=n)
        s.client.sendall(last)
        while not select.select([s.client], [], [], 0.01)[0]:
            if s.result.done():  # returned before this request: it is left over
                break
        if select.select([s.client], [], [], 0)[0]:
            assert s.recv_exact(16 + S)[:16] == simple_reply(n)
            n += 1
            last = b""
    served = s.done()
    assert served.reason == cachedio.IDLE
    assert served.reads == n
    assert served.leftover in (b"", last)  # received and left over, or never received


def test_a_stop_ends_a_session_whose_client_reads_nothing(single, sessions):
    """Revocation must not wait for a client: replies the socket would not take are
    handed back, unsent, for the loop to send before anything else."""
    layer, _, _ = single
    s = Session(layer)
    sessions.append(s)
    s.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    many = b"".join(req(NBD_CMD_READ, 0, 32 * S, cookie=i) for i in range(64))
    s.client.sendall(many)  # 8 MiB of replies; the socket holds far less
    assert select.select([s.client], [], [], 10)[0]  # it answers, then waits to send
    served = s.stop()
    assert served.reason == cachedio.STOPPED and served.unsent
    got = bytearray()
    s.client.setblocking(False)
    try:
        while True:
            chunk = s.client.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    except BlockingIOError:
        pass
    want_len = served.reads * (16 + 32 * S)
    assert len(got) + len(served.unsent) == want_len
    assert many[28 * served.reads:].startswith(served.leftover)  # the rest unread


def test_the_client_leaving_ends_the_session(single, sessions):
    layer, _, _ = single
    s = Session(layer)
    sessions.append(s)
    s.client.sendall(req(NBD_CMD_READ, 0, S, cookie=1))
    assert s.recv_exact(16 + S)[:16] == simple_reply(1)
    s.client.shutdown(socket.SHUT_WR)
    assert s.done().reason == cachedio.CLOSED


def test_a_read_only_disk_leaves_writes_to_the_loop(single, sessions):
    layer, _, _ = single
    s = Session(layer, read_only=True)
    sessions.append(s)
    write = req(NBD_CMD_WRITE, 0, S, cookie=1, payload=bytes(S))
    s.client.sendall(write)
    assert s.done().leftover == write


def test_a_closed_engine_serves_nothing(single, sessions):
    layer, _, _ = single
    serve = cachedio.serve_prepared(layer, size=SIZE, min_block=1, structured=False,
                                    read_only=False, max_read=INLINE_READ_MAX)
    layer._cipher.close()  # revoked between the loop's check and the thread's start
    a, b = socket.socketpair()
    stop = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        b.sendall(req(NBD_CMD_READ, 0, S, cookie=1))
        served = serve(a.fileno(), stop, bytearray(1), LONG, LONG)
    finally:
        a.close()
        b.close()
        os.close(stop)
    assert (served.reason, served.reads) == (cachedio.DECLINED, 0)


def test_a_stop_ends_a_session_whose_client_keeps_sending(single, sessions):
    """Revocation stops a session at its next pass even when requests never stop coming
    (the stop is not only seen while waiting for them)."""
    layer, _, _ = single
    s = Session(layer)
    sessions.append(s)
    sending = threading.Event()
    stop_sending = threading.Event()

    def client():  # eight in flight, always: the session never waits to receive
        inflight = 0
        try:
            while not stop_sending.is_set():
                while inflight < 8:
                    s.client.sendall(req(NBD_CMD_READ, 0, S, cookie=1))
                    inflight += 1
                s.recv_exact(16 + S)
                inflight -= 1
                sending.set()
        except (OSError, AssertionError):  # the session stopped answering; the test ends
            pass
    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        assert sending.wait(10)
        s.stop_flag[0] = 1
        os.eventfd_write(s.stop_fd, 1)
        served = s.result.result(5)  # far less than the session's LONG limits
    finally:
        stop_sending.set()
    assert served.reason == cachedio.STOPPED and served.reads > 0


def test_a_client_that_reads_no_replies_gets_them_from_the_loop_after_max_ms(single, sessions):
    """A session never waits for a client's reading longer than its time: what the socket
    would not take goes back, unsent, to the loop (its budget and back-pressure)."""
    layer, _, _ = single
    s = Session(layer, max_ms=300)
    sessions.append(s)
    s.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.client.sendall(b"".join(req(NBD_CMD_READ, 0, 32 * S, cookie=i) for i in range(64)))
    served = s.result.result(10)
    assert served.reason == cachedio.IDLE and served.unsent
