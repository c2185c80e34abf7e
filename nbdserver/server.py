"""The asyncio NBD server: a thin loop over the pure protocol.

One `Connection` (an asyncio buffered protocol) per client. It feeds bytes to the
handshake machine, then to the request parser, checks each request with `transmission.check`,
and runs it against the export's backend as its entry in `COMMANDS` says:

- inline on the event loop when the backend says it can finish without blocking
  (`nowait=True`: page-cache reads, small buffered writes) — a 4 KiB request then
  costs no thread hop and no task;
- a READ that misses the page cache on the server's native read queue
  (`_readq.ReadQueue`, through `BlockBackend.submit_read`): native threads run preadv,
  and an encrypting layer's decryption, without the GIL, and the loop collects every
  finished read at once when the queue's eventfd fires;
- otherwise on a worker thread, replying from a future callback. Replies may go out of
  order, as the spec allows, but a request completed off the loop (worker or read
  queue) is passed by a bounded number of later ones (`OVERTAKE_MAX`): then the
  connection waits for it.

Errors of the lower layer (OSError) become NBD errors once, in `_fail`; what a reply
looks like on the wire (simple or structured, data and hole chunks) is the pure
protocol's to say (`transmission.read_reply` and its siblings). Memory stays
bounded: reading pauses while too many requests are in flight, while the client is not
reading its replies (transport write buffer over its high mark), and while the server's
buffer budget over all connections is spent (nbdserver/budget.py). Who may connect, and
for how long a handshake may last, is nbdserver/admission.py's; what a client may see of
the exports, nbdserver/visibility.py's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from time import monotonic_ns

from . import cachedio
from ._readq import ReadQueue
from .admission import Admission, ConnectionLimits, peer_key
from .backend import INLINE_WRITE_MAX
from .budget import BufferBudget
from .exports import Export, ExportCatalog
from .iostats import ENABLED as IO_STATS
from .iostats import LATENCY_MASK, OTHER_CMD
from .loglimit import LogLimiter
from .protocol import handshake as hs
from .protocol.constants import (
    BASE_ALLOCATION,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ESHUTDOWN,
    NBD_FLAG_READ_ONLY,
)
from .protocol.transmission import (
    REQUEST_SIZE,
    BadMagic,
    Oversized,
    RequestParser,
    block_status_chunk,
    block_status_descriptors,
    check,
    error_reply,
    nbd_error,
    read_reply,
    read_reply_head,
    simple_reply,
)
from .readqueue import make_read_queue
from .tls import client_identity, tls_summary
from .visibility import ClientView, ExportList

log = logging.getLogger("nbdserver.server")
# Refusals anyone can cause are logged at a bounded rate (nbdserver/loglimit.py).
limited_log = LogLimiter(log)

# Reads above this size go to a worker even when cached: decryption of a large request
# then runs beside the event loop (the native engine releases the GIL).
INLINE_READ_MAX = 128 * 1024
# The shared receive buffer's size, as uvloop's own for a plain protocol.
RECV_BUFFER = 256 * 1024
# NBDSERVER_CACHED_IO=0 turns the page-cache fast path (nbdserver/cachedio.py) off, to
# measure it against the usual path side by side; the replies are the same.
CACHED_IO = os.environ.get("NBDSERVER_CACHED_IO", "1") != "0"
# A connection whose received chunks the fast path answers wholly is handed to a thread of
# its own that serves it natively, the GIL given up (cachedio.serve_prepared,
# _cachedio.c's serve), until a request needs this loop. Why: at queue depth 1 every
# request otherwise wakes the event loop and runs Python on a cold interpreter between
# the client's request and its reply, and every connection of a process shares one core.
# NBDSERVER_NATIVE_SESSIONS=0 turns it off, to measure it side by side.
NATIVE_SESSIONS = CACHED_IO and os.environ.get("NBDSERVER_NATIVE_SESSIONS", "1") != "0"
SESSION_MAX = 8  # threads serving connections natively at once, per process
SESSION_IDLE_MS = 20  # a session returns after this long without a request
SESSION_MAX_MS = 1000  # and after this long in all (its statistics are counted then)
# After a session returned at a request it could not answer, this many chunks are
# answered on the loop before a new session: a mixed load pays the hand-off rarely.
SESSION_COOLDOWN = 64
# Per connection: stop reading new requests above this many in flight.
MAX_INFLIGHT = 64
# Per connection: a request waiting for a worker is overtaken by at most this many later
# requests; then no new request starts until it completes (reading pauses meanwhile).
# Without a bound, cached 4 KiB requests answered inline could pass one worker request
# for as long as the client kept sending them: the event loop holds the GIL the worker
# needs, and a worker's completion is handled only between two batches (2,270 passed one
# 127 KiB write under a mixed load). 256 lets the loop run a few milliseconds of inline
# work past a worker request, several times what a worker request normally takes, so a
# mixed load on warm or cold data hardly ever stops on it, while a starved one waits for
# at most that much (4 x MAX_INFLIGHT; cheap to count, nothing timed).
OVERTAKE_MAX = 256
# The inline attempt at a small READ (RWF_NOWAIT) costs the loop a syscall, and on a miss
# the kernel starts the disk read from the loop's own thread. After this many misses in
# a row a connection stops trying, and only every PROBE_EVERY-th read tries again (one
# hit and it is back to trying every read): a client on cold data goes straight to the
# read queue, one on warm data never notices.
NOWAIT_MISSES_MAX = 8
PROBE_EVERY = 16
_NEVER = 1 << 62  # _hold_at while no request waits for a worker
# Threads of the native read queue, started as cold reads wait for them. Through the
# ThreadPoolExecutor each cold read went loop -> worker -> loop with the GIL taken twice
# on the worker, and threads queuing for the GIL, not the disk, serialized cold reads
# (more workers changed nothing). The queue's threads never take the GIL, so cold reads
# overlap up to the clients' queue depth: as many threads as two connections' requests
# in flight, beyond which reads wait for a thread in order.
READ_THREADS = 2 * MAX_INFLIGHT
# Per connection: stop reading while this much reply data waits for the client.
WRITE_BUFFER_HIGH = 8 << 20
# Structured reads at least this large ask the backend for holes and send OFFSET_HOLE.
HOLE_SCAN_MIN = 64 * 1024
# _request's answer when a READ must wait for the server's buffer budget.
WAIT_FOR_BUDGET = object()
# Closing a TLS connection sends close_notify and waits for the peer's; an idle client
# (libnbd between requests) never answers, and the default 30 s held every shutdown.
TLS_SHUTDOWN_TIMEOUT = 3.0
# Selections (GO) of a disk that then failed to open, per connection, before the server
# closes it: each asks the key service for a DEK, which a client looping on one
# connection must not get to do without bound.
MAX_FAILED_SELECTIONS = 3


class NbdServer:
    def __init__(self, catalog: ExportCatalog, *, workers: int = 8,
                 tls_mode: hs.TlsMode = hs.TlsMode.OFF, tls_context: ssl.SSLContext | None = None,
                 limits: ConnectionLimits | None = None, export_list: ExportList = ExportList.ALL,
                 handoff=None):
        if tls_mode is not hs.TlsMode.OFF and tls_context is None:
            raise ValueError("TLS mode needs an SSL context")
        self.catalog = catalog
        self.limits = limits or ConnectionLimits()
        self.export_list = export_list
        self.admission = Admission(self.limits)
        self.budget = BufferBudget(self.limits.buffer_budget)
        self.tls_mode = tls_mode
        self.tls_context = tls_context
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        # Threads serving connections natively (NATIVE_SESSIONS), made on first use.
        self._session_pool: ThreadPoolExecutor | None = None
        self.sessions = 0
        # Made on the event loop by the first cold read (it registers an eventfd there).
        self.read_queue: ReadQueue | None = None
        self.connections: set[Connection] = set()
        # Where every connection of this server receives, but for large WRITE payloads
        # (Connection.get_buffer); the loop fills it for one connection at a time.
        self.recv_buffer = memoryview(bytearray(RECV_BUFFER))
        # Where plain-TCP connections go once in transmission (nbdserver/iopool.py's
        # I/O worker processes); None: every connection is served here.
        self.handoff = handoff
        self.shutting_down = False
        self._servers: list[asyncio.AbstractServer] = []

    async def listen(self, host: str, port: int) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Connection(self), host, port,
                                          reuse_address=True, backlog=512)
        self._servers.append(server)
        if self.admission.max_total < self.limits.max_connections:
            log.info("taking at most %d NBD connections (descriptor limit %d less a reserve of %d)",
                     self.admission.max_total, self.admission.max_total + self.limits.fd_reserve,
                     self.limits.fd_reserve)
        return [s.getsockname()[:2] for s in server.sockets]

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting; finish in-flight requests (new ones get ESHUTDOWN); close."""
        self.shutting_down = True
        for s in self._servers:
            s.close()
        for c in list(self.connections):
            c.begin_shutdown()
        waits = [c.closed for c in list(self.connections)]
        if waits:
            done, pending = await asyncio.wait(waits, timeout=grace)
            for c in list(self.connections):
                c.abort()
        if self.handoff is not None:
            await self.handoff.shutdown(grace)
        for s in self._servers:
            await s.wait_closed()
        self._close_read_queue()
        self.pool.shutdown(wait=True)
        if self._session_pool is not None:
            self._session_pool.shutdown(wait=True)

    def session_pool(self) -> ThreadPoolExecutor:
        if self._session_pool is None:
            self._session_pool = ThreadPoolExecutor(max_workers=SESSION_MAX,
                                                    thread_name_prefix="nbd-session")
        return self._session_pool

    async def adopt(self, sock: socket.socket, export: Export, *, structured: bool, min_block: int,
                    meta_id: int | None, size: int, leftover: bytes) -> Connection:
        """Serve a connection another process negotiated (nbdserver/ioworker.py): it is
        in transmission from its first byte here, `leftover` being what that process
        had read past the handshake."""
        conn = Connection(self)
        conn.export = export
        conn._adopted = (structured, min_block, meta_id, leftover, size)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)
        return conn

    # -- the native read queue
    def reads(self) -> ReadQueue | None:
        """The read queue, made on first use; None once shutting down."""
        if self.read_queue is None and not self.shutting_down:
            queue = make_read_queue(READ_THREADS)  # io_uring or threads (readqueue.py)
            asyncio.get_running_loop().add_reader(queue.fileno(), self._reads_done)
            self.read_queue = queue
        return self.read_queue

    def _reads_done(self):
        """The read queue's eventfd fired: answer every read it finished, each
        connection's replies in one writelines()."""
        self._complete_reads(self.read_queue.collect())

    def _complete_reads(self, finished):
        batch = []
        for (conn, req, buf, export, mark), result in finished:
            if conn._out is None:  # the first of this connection's replies in this batch
                conn._out = []
                batch.append(conn)
            try:
                conn._read_done(req, buf, export, mark, result)
            except Exception:  # a bug must cost this client its connection, never the server
                log.exception("connection %s: internal error; disconnecting", conn.peer)
                conn.abort()
        for conn in batch:
            conn._end_batch()

    def _close_read_queue(self):
        """Join the queue's threads; reads still in flight (connections aborted after the
        grace) end here, so their exports' in-flight counts come back to zero."""
        queue, self.read_queue = self.read_queue, None
        if queue is not None:
            asyncio.get_running_loop().remove_reader(queue.fileno())
            self._complete_reads(queue.close())


class Connection(asyncio.BufferedProtocol):
    """One client. Bytes are received into the server's shared receive buffer and go on
    as a copy (`data_received`), except the rest of a large WRITE's payload: that is
    received straight into its own buffer (or its encrypting stage's), which saves a
    copy of every byte of an image copy or a restore."""

    def __init__(self, server: NbdServer):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made sets it
        self.view = ClientView(server.catalog, server.export_list)
        self.handshake: hs.Handshake | None = hs.Handshake(self.view, tls_mode=server.tls_mode)
        self.parser: RequestParser | None = None
        self.export: Export | None = None
        self.structured = False
        self.meta_id: int | None = None
        # The alignment this client agreed to (handshake.Negotiated.min_block); 1 = any.
        self.min_block = 1
        self.size = 0  # the export's size as this client was told it (_transmit)
        self.nowait_misses = 0  # small READs in a row the page cache missed (NOWAIT_MISSES_MAX)
        # The next READ's RWF_NOWAIT attempt was made, and missed, by the fast path.
        self._tried_nowait = False
        self.inflight = 0
        self.disconnecting = False
        self.shutting_down = False
        # Fairness (OVERTAKE_MAX): requests started so far, the requests on workers in
        # the order they started (each a one-item list: its start number, -1 once done),
        # and the start number at which no more start until the oldest of them is done.
        self._started = 0
        self._on_workers: deque = deque()
        self._hold_at = _NEVER
        self._reading_paused = False
        self._out: list | None = None  # reply bytes of the batch being processed
        self._writing_paused = False
        # Requests parsed but not started: one received chunk can hold thousands of
        # request headers, so the in-flight and write-buffer limits are applied per
        # request, not per chunk (else a client that never reads its replies could make
        # the server allocate a reply buffer for every header it sent).
        self._pending: deque = deque()
        self._draining = False
        # The request whose latency is being sampled (one at a time: LATENCY_SAMPLE), and
        # when it started; completions compare by identity, the cheapest test there is.
        self._sampled: object = None
        self._sampled_t0 = 0
        self.closed: asyncio.Future = self.loop.create_future()
        self.peer = None
        self._peer_key: str | None = None  # set while counted by the server's Admission
        # The server's BufferBudget (nbdserver/budget.py): bytes of READ buffers in
        # progress, reply bytes handed to the transport and not yet known sent, and
        # whether this connection waits for the budget (reading paused meanwhile).
        self._charged = 0
        self._charged_written = 0
        self._awaiting_budget = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        # Decrypted bytes that reach data_received() while start_tls() has not returned yet
        # (the TLS layer delivers them as soon as its handshake ends); None when not upgrading.
        self._tls_early: bytearray | None = None
        self._adopted: tuple | None = None  # NbdServer.adopt's negotiated parameters
        self._failed_selections = 0
        # While a thread serves this connection natively (_start_session): its stop
        # eventfd and its own descriptor of the socket. Chunks left before the next try.
        self._session: tuple[int, int, bytearray] | None = None
        self._session_cooldown = 0
        # get_buffer handed out the parser's payload room, not the shared buffer.
        self._into_payload = False

    # -- asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.view.peer = self.peer
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.server.connections.add(self)
        if self.server.shutting_down:
            transport.close()
            return
        if self._adopted is not None:  # admitted and negotiated by the main process
            self.handshake = None
            self._transmit(*self._adopted)
            return
        key = peer_key(self.peer)
        refused = self.server.admission.admit(key)
        if refused is not None:
            limited_log.log(f"cap {key}", logging.WARNING,
                            "connection %s: refused: %s", self.peer, refused)
            self.handshake = None
            transport.close()
            return
        self._peer_key = key
        self._handshake_timer = self.loop.call_later(self.server.limits.handshake_timeout,
                                                     self._handshake_expired)
        transport.write(hs.Handshake.greeting())

    def _handshake_expired(self):
        self._handshake_timer = None
        if self.parser is None and self.transport is not None:
            limited_log.log(f"timeout {self._peer_key}", logging.WARNING,
                            "connection %s: handshake not finished after %g s; closing",
                            self.peer, self.server.limits.handshake_timeout)
            # Inside start_tls this aborts the plain socket under the TLS layer, and
            # start_tls's failure path reports the loss.
            self.abort()

    def _release(self):
        """Stop counting this connection against the caps (idempotent: a failed TLS
        handshake reports its loss itself, and asyncio may too)."""
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._peer_key is not None:
            self.server.admission.release(self._peer_key)
            self._peer_key = None

    def connection_lost(self, exc):
        self._release()
        self.stop_session()
        self.server.budget.forget(self)
        self._awaiting_budget = False
        if self._charged_written:  # the transport's buffer went with it
            self.server.budget.give(self._charged_written)
            self._charged_written = 0
        self.server.connections.discard(self)
        if self.export is not None:
            peer = "{}:{}".format(*self.peer[:2]) if isinstance(self.peer, tuple) else str(self.peer)
            log.info("NBD client %s detached from export %r", peer, self.export.name,
                     extra={"peer": peer, "export": self.export.name})
            self.server.catalog.detach(self.export, self)
        self.handshake = None
        if not self.closed.done():
            self.closed.set_result(None)

    # -- the buffer budget (a holder, in nbdserver/budget.py's words)
    @property
    def budget_held(self) -> int:
        return self._charged + self._charged_written

    def budget_settle(self) -> None:
        """Give back the reply bytes the transport no longer holds."""
        t = self.transport
        queued = t.get_write_buffer_size() if t is not None and not t.is_closing() else 0
        if self._charged_written > queued:
            self.server.budget.give(self._charged_written - queued)
            self._charged_written = queued
            if not queued:
                self.server.budget.replies_sent(self)

    def budget_ready(self) -> None:
        self._awaiting_budget = False
        self._update_reading()

    def _charge(self, n: int) -> bool:
        if self.server.budget.take(self, n):
            self._charged += n
            return True
        self._awaiting_budget = True
        return False

    def _uncharge(self, n: int) -> None:
        self._charged -= n
        self.server.budget.give(n)

    def _reply_charged(self, n: int) -> None:
        """A READ's buffer went to the transport: it is held until sent."""
        self._charged -= n
        self._charged_written += n
        self.server.budget.holding_replies(self)

    def pause_writing(self):
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self):
        self._writing_paused = False
        self._update_reading()

    def get_buffer(self, sizehint):
        parser = self.parser
        if parser is not None:
            room = parser.payload_space()
            if room is not None:
                self._into_payload = True
                return room
        self._into_payload = False
        return self.server.recv_buffer

    def buffer_updated(self, nbytes):
        if self._into_payload:
            self._into_payload = False
            try:
                events = self.parser.payload_received(nbytes)
                if events:
                    self._requests(events)
            except Exception:  # a bug must cost this client its connection, never the server
                log.exception("connection %s: internal error; disconnecting", self.peer)
                self.abort()
            return
        # Copied out first: the buffer is every connection's (the loop fills one at a time).
        self.data_received(bytes(self.server.recv_buffer[:nbytes]))

    def data_received(self, data):
        if self._tls_early is not None:
            self._tls_early += data
            return
        self._received(data, fast=CACHED_IO)

    def _received(self, data, *, fast: bool):
        """Received bytes, in order: first to the page-cache fast path (with `fast`), then
        to the parser (or the handshake)."""
        try:
            if self.parser is not None:
                if fast and len(data) >= REQUEST_SIZE:
                    data = self._answer_cached(data)
                    if not data:
                        return
                self._requests(self.parser.feed(data))
            elif self.handshake is not None:
                self._handshake(data)
        except Exception:  # a bug must cost this client its connection, never the server
            log.exception("connection %s: internal error; disconnecting", self.peer)
            self.abort()

    def eof_received(self):
        return False  # close our side too

    # -- handshake
    def _handshake(self, data):
        self._handle(self.handshake.receive(data))

    def _handle(self, actions):
        ready = next((a for a in actions if isinstance(a, hs.Ready)), None)
        if ready is not None:
            # The client selected its export: the catalog opens it (a disk's key is
            # unwrapped only now) before the selection's replies go out.
            self.transport.pause_reading()
            self.loop.create_task(self._attach(actions, ready.negotiated.export.name))
            return
        self._act(actions)

    async def _attach(self, actions, name):
        export = await self.server.catalog.attach(name, self, peer=self.peer,
                                                  identity=self.view.identity)
        if self.handshake is None or self.transport is None or self.transport.is_closing():
            if export is not None:  # the client left while its export opened
                self.server.catalog.detach(export, self)
            return
        if export is None:
            # Opening failed after the handshake had accepted the name (the key was
            # refused meanwhile, the file is gone): fail closed, the selection's replies
            # never go out. What the options before it answered does; then GO gets the
            # spec's "not available" and the client may go on (EXPORT_NAME: a close).
            log.info("connection %s: export %r could not be opened", self.peer, name)
            i = next(i for i, a in enumerate(actions) if isinstance(a, hs.Ready))
            self._act(actions[:i - actions[i].replies])
            if self.transport.is_closing():
                return
            events = self.handshake.unready(f"export {name!r} is not available")
            self._failed_selections += 1
            if self._failed_selections >= MAX_FAILED_SELECTIONS:
                log.info("connection %s: %d selections failed; closing", self.peer,
                         self._failed_selections)
                self._act(events[:1])  # the GO's error (EXPORT_NAME's Close closes anyway)
                self.transport.close()
                return
            self.transport.resume_reading()
            self._handle(events)
            return
        self.export = export
        tls = self.transport.get_extra_info("ssl_object") is not None
        peer = "{}:{}".format(*self.peer[:2]) if isinstance(self.peer, tuple) else str(self.peer)
        log.info("NBD client %s attached to export %r (%s)", peer, name, "TLS" if tls else "no TLS",
                 extra={"peer": peer, "export": name, "tls": tls})
        self.transport.resume_reading()
        try:
            self._act(actions)
        except Exception:  # a bug must cost this client its connection, never the server
            log.exception("connection %s: internal error; disconnecting", self.peer)
            self.abort()

    def _act(self, actions):
        for action in actions:
            if isinstance(action, hs.Send):
                self.transport.write(action.data)
            elif isinstance(action, hs.StartTls):
                self.transport.pause_reading()
                self.loop.create_task(self._start_tls())
                return
            elif isinstance(action, hs.Ready):
                self._enter_transmission(action.negotiated)
            elif isinstance(action, hs.Close):
                log.info("connection %s: closing in handshake: %s", self.peer, action.reason)
                self.transport.close()
                return

    async def _start_tls(self):
        if self.handshake is None or self.handshake.state is not hs.State.TLS_PENDING:
            # Gone, or the client sent plaintext after STARTTLS (the machine closed): the
            # bytes it sent are not a TLS handshake, so upgrading would only hang.
            self.abort()
            return
        self._tls_early = bytearray()
        try:
            tls_transport = await self.loop.start_tls(
                self.transport, self, self.server.tls_context, server_side=True,
                ssl_handshake_timeout=self.server.limits.handshake_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
            if tls_transport is None or tls_transport.is_closing():
                # The socket closed under the handshake (our shutdown, or the client left):
                # uvloop then returns no transport instead of raising.
                raise ConnectionResetError("connection closed during the TLS handshake")
        except (OSError, ssl.SSLError, ConnectionError) as e:
            self._tls_early = None
            log.info("connection %s: TLS handshake failed: %s", self.peer, e)
            self.abort()
            # The transport belonged to the TLS layer by now, which tells the application
            # protocol nothing when its handshake fails: we never hear connection_lost,
            # and shutdown would wait its whole grace for this connection.
            self.connection_lost(e)
            return
        self.transport = tls_transport
        ssl_object = tls_transport.get_extra_info("ssl_object")
        log.info("connection %s: %s", self.peer, tls_summary(ssl_object))
        self.view.identity = client_identity(ssl_object)
        early, self._tls_early = bytes(self._tls_early), None
        if self.handshake is None:  # the connection was lost during the TLS handshake
            return
        self.handshake.tls_established()
        # The TLS transport is a new one with asyncio's default 64 KiB high mark: one
        # large read reply would pause reading and serialise the client's queue.
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.transport.resume_reading()
        if early:
            self.data_received(early)
        if self.shutting_down and self.parser is None:  # still negotiating: nothing to finish
            self.transport.close()

    def _enter_transmission(self, negotiated: hs.Negotiated):
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        meta_id = next((i for i, n in negotiated.meta_contexts.items() if n == BASE_ALLOCATION), None)
        assert self.handshake is not None  # this runs once, as the handshake ends
        leftover = self.handshake.leftover
        if self.server.handoff is not None and self._hand_off(negotiated, meta_id, leftover):
            return
        self.handshake = None
        self._transmit(negotiated.structured_replies, negotiated.min_block, meta_id, leftover,
                       negotiated.export.size)

    def _hand_off(self, negotiated: hs.Negotiated, meta_id, leftover) -> bool:
        """Move this connection to an I/O worker process (nbdserver/iopool.py); False:
        it stays here. A TLS session stays: its state is this process's SSL object."""
        t, export = self.transport, self.export
        if (negotiated.tls or t.get_extra_info("ssl_object") is not None or export is None
                or export.is_frozen or export.locked or self.shutting_down
                or t.get_write_buffer_size()):  # the handshake's last reply still queued here
            return False
        sock = t.get_extra_info("socket")
        if sock is None or not self.server.handoff.hand_off(
                sock.fileno(), self, export, negotiated, meta_id, leftover, self._peer_key):
            return False
        # Its attachment and its place under the caps moved with it (to the worker's
        # record, released when the worker reports the connection's end).
        self._peer_key, self.export, self.handshake = None, None, None
        self.server.connections.discard(self)
        t.abort()  # closes this process's descriptor only (no shutdown): the worker's lives on
        return True

    def _transmit(self, structured: bool, min_block: int, meta_id, leftover, size: int) -> None:
        # The size this client was told: requests are checked against it even after the
        # disk grew online (NBD has no way to announce a new size; a reconnect learns it).
        self.size = size
        self.structured = structured
        self.min_block = min_block
        self.meta_id = meta_id
        self.parser = RequestParser(stage=self._stage_write)
        if self.shutting_down:
            self.begin_shutdown()
        if leftover:
            self._requests(self.parser.feed(leftover))

    # -- transmission
    def _answer_cached(self, data):
        """The READs and small WRITEs at the head of `data` that the page cache serves,
        answered in one native call (nbdserver/_cachedio.c) when nothing else is in the
        way; returns what is left for the parser. What the native call declines (any
        other request, a cache miss, a busy stripe, an error) takes the usual path,
        which sends what it always sent: the native call sends only the replies that
        path would have sent."""
        export = self.export
        if (self._pending or self._draining or not self.parser.at_boundary() or self._backlogged()
                or self.disconnecting or self.shutting_down or export.locked or export.is_frozen):
            return data
        room = self._hold_at - self._started  # a request a worker holds back (OVERTAKE_MAX)
        budget = self.server.budget
        if room <= 0 or not budget.try_take(self, cachedio.MAX_BYTES):
            return data
        now = monotonic_ns()
        # Every LATENCY_SAMPLE-th request is timed, one at a time: which of these it is.
        sample = (LATENCY_MASK - (self._started & LATENCY_MASK)
                  if IO_STATS and self._sampled is None else -1)
        try:
            done = cachedio.answer(data, export.backend, size=self.size, min_block=self.min_block,
                                   structured=self.structured, max_requests=room,
                                   max_read=INLINE_READ_MAX,
                                   read_only=bool(export.flags & NBD_FLAG_READ_ONLY),
                                   reads=self.nowait_misses < NOWAIT_MISSES_MAX, sample=sample)
        except BaseException:
            budget.give(cachedio.MAX_BYTES)
            raise
        read_bytes = done.read_bytes if done is not None else 0
        if read_bytes < cachedio.MAX_BYTES:
            budget.give(cachedio.MAX_BYTES - read_bytes)
        if done is None:
            return data
        self._count_native(export, done.reads, done.read_bytes, done.writes, done.write_bytes,
                           done.missed)
        if not done.consumed:
            return data
        consumed, replies, reads_done, read_bytes = done[:4]
        if reads_done:
            self._charged += read_bytes
            self._reply_charged(read_bytes)  # held until sent, as _send_read does
        self.transport.write(replies)
        if IO_STATS and done.sampled >= 0:  # from the chunk's arrival to its replies' hand-off
            export.stats.timed(done.sampled, monotonic_ns() - now)
        self.budget_settle()
        if consumed < len(data):
            return memoryview(data)[consumed:]
        if NATIVE_SESSIONS:
            if self._session_cooldown:
                self._session_cooldown -= 1
            else:
                self._start_session()
        return b""

    def _count_native(self, export, reads, read_bytes, writes, write_bytes, missed):
        """What the native code answered (the fast path's call, or a session): started,
        counted in the disk's statistics; a READ answered ends a run of misses, and one
        found uncached (just tried with RWF_NOWAIT) is not tried inline again (_read)."""
        count = reads + writes
        self._started += count
        if IO_STATS and count:
            stats = export.stats
            stats.requests[NBD_CMD_READ] += reads
            stats.bytes[NBD_CMD_READ] += read_bytes
            stats.requests[NBD_CMD_WRITE] += writes
            stats.bytes[NBD_CMD_WRITE] += write_bytes
        if reads:
            self.nowait_misses = 0
        if missed:
            self.nowait_misses += 1
            self._tried_nowait = True

    # -- a thread serving this connection natively (NATIVE_SESSIONS)
    def _start_session(self):
        """Hand the socket to a session thread (cachedio.serve_prepared) when nothing
        else of this connection is in progress: no request in flight or pending, no reply
        waiting in the transport, the disk neither locked nor frozen, plain TCP. Reading
        pauses meanwhile; the disk counts the session as a request in flight, so a lock
        or a freeze (which stop it, Export.stop_sessions) waits for it to return."""
        server, export, t = self.server, self.export, self.transport
        if (self._session is not None or server.sessions >= SESSION_MAX or self.inflight
                or self._pending or self._backlogged() or t.is_closing()
                or t.get_write_buffer_size() or self.disconnecting or self.shutting_down
                or export.locked or export.is_frozen or t.get_extra_info("ssl_object") is not None):
            return
        sock = t.get_extra_info("socket")
        if sock is None:
            return
        serve = cachedio.serve_prepared(
            export.backend, size=self.size, min_block=self.min_block, structured=self.structured,
            read_only=bool(export.flags & NBD_FLAG_READ_ONLY), max_read=INLINE_READ_MAX,
            reads=self.nowait_misses < NOWAIT_MISSES_MAX)
        if serve is None:
            return
        # Every LATENCY_SAMPLE-th request is timed, as on the loop.
        every, first = ((LATENCY_MASK + 1, LATENCY_MASK - (self._started & LATENCY_MASK))
                        if IO_STATS and self._sampled is None else (0, 0))
        fd = stop = -1
        flag = bytearray(1)  # set by stop_session; the session checks it before each pass
        try:
            fd = os.dup(sock.fileno())  # the socket outlives a close of the transport meanwhile
            stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            future = self.loop.run_in_executor(server.session_pool(), serve, fd, stop, flag,
                                               SESSION_IDLE_MS, SESSION_MAX_MS, every, first)
        except (OSError, RuntimeError) as e:  # no descriptor or thread left: serve on the loop
            limited_log.log("native session", logging.WARNING, "no native session for %s: %s",
                            self.peer, e)
            for d in (fd, stop):
                if d >= 0:
                    os.close(d)
            self._session_cooldown = SESSION_COOLDOWN
            return
        self._session = (stop, fd, flag)
        server.sessions += 1
        export.begin()
        export.sessions.add(self)
        self._update_reading()
        future.add_done_callback(lambda f: self._session_done(f, export))

    def stop_session(self):
        """Make the session return now (it answers at most the pass it is in first)."""
        if self._session is not None:
            stop, _, flag = self._session
            flag[0] = 1
            os.eventfd_write(stop, 1)

    def _session_done(self, future, export):
        stop, fd, _ = self._session
        self._session = None
        os.close(stop)
        os.close(fd)
        self.server.sessions -= 1
        export.sessions.discard(self)
        export.end()
        try:
            served = future.result()
        except Exception:  # a bug must cost this client its connection, never the server
            log.exception("connection %s: internal error; disconnecting", self.peer)
            self.abort()
            return
        self._count_native(export, served.reads, served.read_bytes, served.writes,
                           served.write_bytes, served.missed)
        if IO_STATS and served.samples:
            timed = array("Q", served.samples)
            for i in range(0, len(timed), 2):
                export.stats.timed(timed[i], timed[i + 1])
        if served.reason == cachedio.DECLINED:
            self._session_cooldown = SESSION_COOLDOWN
        t = self.transport
        if t is None or t.is_closing():
            return
        if served.unsent:  # held until sent, as _send_read's replies are
            n = len(served.unsent)
            self.server.budget.add(n)
            self._charged += n
            self._reply_charged(n)
            t.write(served.unsent)
        if served.leftover:  # before anything received after it
            # Declined, or stopped at a cold READ (whose pass's replies then could not all
            # be sent): it stopped at the first of these, so the parser takes them (the
            # fast path would only decline it again, or try a cold READ a second time).
            self._received(served.leftover,
                           fast=served.reason != cachedio.DECLINED and not served.missed)
        self._update_reading()
        self._maybe_close()

    def _stage_write(self, offset, length):
        """The parser's `stage`: large WRITE payloads are staged by the disk's backend as
        they arrive (an encrypting layer encrypts each piece straight out of the receive
        buffer). Asked per request, as a locked export may get a new backend; none for
        a write that will be refused anyway."""
        export = self.export
        if export.locked or export.readonly:
            return None
        return export.backend.stage_write(offset, length)

    def _requests(self, events):
        self._pending.extend(events)
        self._drain_pending()

    def _backlogged(self) -> bool:
        return (self._writing_paused or self.inflight >= MAX_INFLIGHT or self._awaiting_budget
                or self._started >= self._hold_at)

    def _write(self, data) -> None:
        """Queue reply bytes; inside a batch they go out in one writelines() call."""
        if self._out is not None:
            self._out.append(data)
        else:
            self.transport.write(data)

    def _flush_out(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)
        if self._charged_written:
            self.budget_settle()

    def _drain_pending(self):
        """Start pending requests while the connection is under its limits.

        The replies of every request started here that completes inline are sent with
        one writelines() at the end: at queue depth 16 a batch of 4 KiB reads then costs
        one send system call instead of two per request."""
        if self._draining:  # re-entered from _update_reading inside a request
            return
        self._draining = True
        self._out = []
        # The export's I/O statistics (nbdserver/iostats.py), counted here inline: a method
        # call per request would cost more than the counting.
        stats = self.export.stats if IO_STATS and self.export is not None else None
        if stats is not None:
            requests, covered = stats.requests, stats.bytes
        now = monotonic_ns()  # a batch's requests arrived together
        try:
            while self._pending and not self._backlogged():
                if self.disconnecting:
                    self._pending.clear()
                    return
                ev = self._pending.popleft()
                self._started += 1
                if type(ev) is BadMagic:
                    log.info("connection %s: bad request magic %#x; disconnecting", self.peer, ev.magic)
                    self.abort()
                    return
                if stats is not None:
                    cmd = ev.cmd if ev.cmd < OTHER_CMD else OTHER_CMD
                    requests[cmd] += 1
                    covered[cmd] += ev.length
                    if not self._started & LATENCY_MASK and self._sampled is None:
                        self._sampled, self._sampled_t0 = ev, now
                if type(ev) is Oversized:
                    self._fail(ev, NBD_EINVAL, "request over the maximum block size")
                    continue
                if self._request(ev) is WAIT_FOR_BUDGET:
                    self._pending.appendleft(ev)
                    self._started -= 1  # not started after all
                    if stats is not None:
                        stats.unstarted(ev.cmd, ev.length)
                    break
        except Exception:  # a bug must cost this client its connection, never the server
            log.exception("connection %s: internal error; disconnecting", self.peer)
            self.abort()
            return
        finally:
            self._draining = False
            self._flush_out()
        self._update_reading()

    def _request(self, req):
        cmd = req.cmd
        export = self.export
        if cmd == NBD_CMD_DISC:
            self.disconnecting = True
            self._maybe_close()
            return
        if self.shutting_down:
            return self._fail(req, NBD_ESHUTDOWN, "server is shutting down")
        if export.locked:
            # The reason (which names the key) is the operator's: the platform logs it.
            return self._fail(req, NBD_EIO, "disk is not available")
        if export.is_frozen:
            self.inflight += 1
            export.park(lambda: self._resume(req))
            return
        err, msg = check(req, self.size, export.flags, has_meta=self.meta_id is not None,
                         min_block=self.min_block)
        if err:
            return self._fail(req, err, msg)
        run, inline = COMMANDS[cmd]
        if inline:  # it tries the loop first and moves off it itself
            return run(self, req, export.backend)
        return self._offload(req, run, export.backend, req)

    def _read(self, req, backend):
        """READ: inline when the page cache has it (RWF_NOWAIT), else the native read
        queue (a cold read), else a worker (large, or holes to scan)."""
        if not self._charge(req.length):
            return WAIT_FOR_BUDGET
        buf = bytearray(req.length)
        if req.length <= INLINE_READ_MAX:
            misses = self.nowait_misses
            if self._tried_nowait:  # by the page-cache fast path, just now: a miss
                self._tried_nowait = False
            elif misses < NOWAIT_MISSES_MAX or not misses % PROBE_EVERY:
                try:
                    backend.pread(memoryview(buf), req.offset, nowait=True)
                except BlockingIOError:
                    self.nowait_misses = misses + 1
                except OSError as e:
                    self._uncharge(req.length)
                    return self._fail(req, nbd_error(e.errno), e.strerror or "read failed")
                else:
                    self.nowait_misses = 0
                    return self._send_read(req, buf)
            else:
                self.nowait_misses = misses + 1
            scanned = self.structured and req.length >= HOLE_SCAN_MIN and backend.capabilities.extents
            if not scanned:
                # A cache miss (or a file that cannot say): on the native read
                # queue, unless this backend cannot be read that way. Reads whose
                # holes are scanned, and larger ones (decrypted straight from the
                # file's mapping under XtsLayer), stay on workers.
                try:
                    if self._queue_read(req, backend, buf):
                        return
                except OSError as e:
                    self._uncharge(req.length)
                    return self._fail(req, nbd_error(e.errno), e.strerror or "read failed")
        try:
            if (getattr(backend, "starts_requests", False) and self._start_aio(
                    req, lambda loop: backend.aio_pread(buf, req.offset, loop), buf)):
                return
        except OSError as e:
            self._uncharge(req.length)
            return self._fail(req, nbd_error(e.errno), e.strerror or "read failed")
        return self._offload(req, self._read_worker, backend, req, buf)

    def _write_request(self, req, backend):
        """WRITE: inline when the backend can take it without blocking (a small
        buffered write), else a worker."""
        fua = bool(req.flags & NBD_CMD_FLAG_FUA)
        stage = req.stage
        if stage is None:
            write, args = _pwrite, (backend, memoryview(req.payload), req.offset, fua)
        elif stage.backend is backend:  # the payload was staged by this disk's backend
            write, args = _commit, (stage, fua)
        else:  # staged by the backend the export had when the write began
            return self._fail(req, NBD_EIO, "the disk was replaced while the write arrived")
        if fua or req.length > INLINE_WRITE_MAX or getattr(backend, "starts_requests", False):
            # Would block (or is too big for the loop) at the bottom of any data
            # path: go to a worker (or start it, _start_aio) now rather than let an
            # encrypting layer do its work inline first and then be refused.
            return self._offload_write(req, write, args, fua)
        try:
            write(*args, nowait=True)
        except BlockingIOError:
            return self._offload_write(req, write, args, fua)
        except OSError as e:
            return self._fail(req, nbd_error(e.errno), e.strerror or "write failed")
        return self._ok(req)

    def _resume(self, req):
        """A request held while its export was frozen (a snapshot) runs now."""
        self.inflight -= 1
        if self.transport is None or self.transport.is_closing():
            return
        self._started += 1
        if self._request(req) is WAIT_FOR_BUDGET:
            self._started -= 1
            self._pending.appendleft(req)
        self._update_reading()
        self._maybe_close()

    def _offload(self, req, fn, *args):
        """Run fn(*args) on a worker; reply when it finishes."""
        export = self.export
        self.inflight += 1
        export.begin()
        try:
            fut = self.loop.run_in_executor(self.server.pool, fn, *args)
        except RuntimeError:  # the pool is shut down
            self.inflight -= 1
            export.end()
            if req.cmd == NBD_CMD_READ:
                self._uncharge(req.length)
            return self._fail(req, NBD_ESHUTDOWN, "server is shutting down")
        mark = self._began_off_loop()
        fut.add_done_callback(lambda f: self._finished(req, f, export, mark))
        self._update_reading()

    def _queue_read(self, req, backend, buf) -> bool:
        """Submit a READ to the server's native read queue; `_read_done` replies. False
        when the backend cannot be read that way (or the server is shutting down)."""
        return self._on_queue(lambda queue, token: backend.submit_read(queue, buf, req.offset, token),
                              req, buf)

    def _offload_write(self, req, write, args, fua):
        """A WRITE that cannot finish inline: on the read queue's ring when the backend
        can write that way (cache=none: O_DIRECT, no worker round trip), else on a worker."""
        backend = self.export.backend
        aio = getattr(backend, "starts_requests", False)
        try:
            if req.stage is None:
                if aio and self._start_aio(
                        req, lambda loop: backend.aio_pwrite(req.payload, req.offset, loop)):
                    return
                if self._queue_write(req, fua):
                    return
            elif aio and self._start_aio(req, req.stage.aio_commit):
                return
        except OSError as e:
            return self._fail(req, nbd_error(e.errno), e.strerror or "write failed")
        return self._offload(req, write, *args)

    def _start_aio(self, req, start, buf=None) -> bool:
        """Start a READ or WRITE that the backend runs itself and completes on this loop
        (librbd aio under an RBD disk: nbdserver/rbdbackend.py) instead of a worker
        waiting for it: requests in flight are then bounded by the clients, not by the
        pool. Such a backend has no cache below, so a completed write is durable (FUA).
        `start(loop)` starts it (the caller asked the backend's `starts_requests`); False
        when it cannot (unaligned, its lock not yet held, its sectors busy)."""
        try:
            inner = start(self.loop)
        except BlockingIOError:
            return False
        export = self.export
        assert export is not None  # requests arrive only in transmission
        self.inflight += 1
        export.begin()
        mark = self._began_off_loop()
        if req.cmd == NBD_CMD_READ:  # what _finished sends: the parts of the reply
            fut = self.loop.create_future()
            parts = [(req.offset, req.length, memoryview(buf))]
            inner.add_done_callback(lambda f: fut.set_exception(f.exception()) if f.exception()
                                    else fut.set_result(parts))
        else:
            fut = inner
        fut.add_done_callback(lambda f: self._finished(req, f, export, mark))
        self._update_reading()
        return True

    def _queue_write(self, req, fua) -> bool:
        export = self.export
        assert export is not None  # requests arrive only in transmission
        backend = export.backend
        return self._on_queue(lambda queue, token: backend.submit_write(
            queue, req.payload, req.offset, token, fua=fua), req, None)

    def _on_queue(self, submit, req, buf) -> bool:
        """`submit(queue, token)` a READ (into `buf`) or a WRITE (`buf` None) to the read
        queue, which hands `token` back to `_read_done`; False when there is no queue or
        the backend declines."""
        queue = self.server.reads()
        if queue is None:
            return False
        export = self.export
        assert export is not None  # requests arrive only in transmission
        mark = [self._started]
        if not submit(queue, (self, req, buf, export, mark)):
            return False
        # In flight until collected: a revocation's drain waits for it, so the disk's key
        # and file outlive it.
        self.inflight += 1
        export.begin()
        self._began_off_loop(mark)
        self._update_reading()
        return True

    def _read_done(self, req, buf, export, mark, result):
        """The read queue finished a READ (or a WRITE, `_queue_write`): `result` is its
        byte count or -errno. Runs inside a batch (NbdServer._complete_reads); the
        batch's end sends the replies."""
        self.inflight -= 1
        export.end()
        self._ended_off_loop(mark)
        if buf is None:  # a write
            if self.transport is not None and not self.transport.is_closing():
                if result < 0:
                    self._fail(req, nbd_error(-result), os.strerror(-result))
                else:
                    self._ok(req)
            return
        if result < 0 or self.transport is None or self.transport.is_closing():
            self._uncharge(req.length)  # no reply will hold the buffer
            if result < 0:  # this request fails; the connection goes on
                self._fail(req, nbd_error(-result), os.strerror(-result))
            return
        self._send_read(req, buf)

    def _end_batch(self):
        self._flush_out()
        self._update_reading()
        self._maybe_close()

    def _began_off_loop(self, mark=None) -> list:
        """Fairness (OVERTAKE_MAX): a request that completes off the loop (a worker, the
        read queue) starts now; its mark is its start number until it completes."""
        if mark is None:
            mark = [self._started]
        if not self._on_workers:
            self._hold_at = mark[0] + OVERTAKE_MAX
        self._on_workers.append(mark)
        return mark

    def _ended_off_loop(self, mark) -> None:
        # They finish in any order: forget the finished ones at the head of the queue
        # (each is popped once), and the hold moves on to the oldest still running.
        mark[0] = -1
        waiting = self._on_workers
        while waiting and waiting[0][0] < 0:
            waiting.popleft()
        self._hold_at = waiting[0][0] + OVERTAKE_MAX if waiting else _NEVER

    def _finished(self, req, fut, export, mark):
        self.inflight -= 1
        export.end()
        self._ended_off_loop(mark)
        # Retrieve the outcome even when nobody is left to tell: asyncio logs a future's
        # unretrieved exception as an error with a traceback.
        exc = fut.exception()
        closing = self.transport is None or self.transport.is_closing()
        if req.cmd == NBD_CMD_READ and (closing or exc is not None):
            self._uncharge(req.length)  # no reply will hold the buffer
        if closing:
            self._maybe_close()
            return
        if exc is not None:
            if isinstance(exc, OSError):
                self._fail(req, nbd_error(exc.errno), exc.strerror or str(exc))
            else:
                log.error("connection %s: backend error", self.peer, exc_info=exc)
                self._fail(req, NBD_EIO, "internal error")
        else:
            result = fut.result()
            if req.cmd == NBD_CMD_READ:
                self._send_read_parts(req, result)
            elif req.cmd == NBD_CMD_BLOCK_STATUS:
                self._write(block_status_chunk(req.cookie, self.meta_id, result))
                if req is self._sampled:
                    self._timed(req)
            else:
                self._ok(req)
        self._update_reading()
        self._maybe_close()

    def _read_worker(self, backend, req, buf):
        """Worker side of a READ: the parts to send, holes separated when structured."""
        view = memoryview(buf)
        if self.structured and req.length >= HOLE_SCAN_MIN and backend.capabilities.extents:
            parts = []
            pos = req.offset
            for ext in backend.block_status(req.offset, req.length):
                n = min(ext.length, req.offset + req.length - pos)
                if ext.zero:
                    parts.append((pos, n, None))
                else:
                    backend.pread(view[pos - req.offset:pos - req.offset + n], pos)
                    parts.append((pos, n, view[pos - req.offset:pos - req.offset + n]))
                pos += n
            if pos < req.offset + req.length:  # block status may describe less than asked
                rest = req.offset + req.length - pos
                backend.pread(view[pos - req.offset:], pos)
                parts.append((pos, rest, view[pos - req.offset:]))
            return parts
        backend.pread(view, req.offset)
        return [(req.offset, req.length, view)]

    def _send_read(self, req, buf):
        if req is self._sampled:
            self._timed(req)
        self._reply_charged(req.length)
        self._write(read_reply_head(req.cookie, req.offset, len(buf), structured=self.structured))
        self._write(buf)

    def _send_read_parts(self, req, parts):
        if req is self._sampled:
            self._timed(req)
        self._reply_charged(req.length)
        for piece in read_reply(req.cookie, parts, structured=self.structured):
            self._write(piece)

    def _timed(self, req) -> None:
        """The sampled request (LATENCY_SAMPLE) is answered: its latency."""
        self._sampled = None
        if self.export is not None:
            self.export.stats.timed(req.cmd, monotonic_ns() - self._sampled_t0)

    def _ok(self, req):
        if req is self._sampled:
            self._timed(req)
        self._write(simple_reply(req.cookie))

    def _fail(self, req, error: int, message: str):
        if IO_STATS and self.export is not None:
            self.export.stats.failed(error)
            if req is self._sampled:
                self._timed(req)
        if self.transport is None or self.transport.is_closing():
            return
        self._write(error_reply(req.cookie, error, message, structured=self.structured))

    # -- flow control and teardown
    def _update_reading(self):
        if self.transport is None or self.transport.is_closing():
            return
        if self._charged_written:
            self.budget_settle()
        want_pause = self._backlogged() or bool(self._pending) or self._session is not None
        if self._pending and not self._backlogged() and not self._draining:
            self._drain_pending()  # ends by calling us again
            return
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def _maybe_close(self):
        if (self.disconnecting or self.shutting_down) and self.inflight == 0 and self._session is None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    def begin_shutdown(self):
        self.shutting_down = True
        self.stop_session()
        if self.handshake is not None:
            self.handshake.shutting_down = True
        if self.parser is None:  # still negotiating: nothing to finish
            if self.transport is not None:
                self.transport.close()
            return
        self._maybe_close()

    def abort(self):
        self.disconnecting = True
        self.stop_session()
        if self.transport is not None:
            self.transport.abort()


def _pwrite(backend, data, offset, fua, nowait=False):
    # Owned: the payload is this request's alone (RequestParser), so an encrypting layer
    # may encrypt it in place (and restores it if the write is refused for a worker).
    backend.pwrite(data, offset, fua=fua, nowait=nowait, owned=True)


def _commit(stage, fua, nowait=False):
    stage.commit(fua=fua, nowait=nowait)


def _flush(backend, req):
    backend.flush()


def _trim(backend, req):
    backend.trim(req.offset, req.length, fua=bool(req.flags & NBD_CMD_FLAG_FUA))


def _zero(backend, req):
    flags = req.flags
    backend.zero(req.offset, req.length, may_trim=not flags & NBD_CMD_FLAG_NO_HOLE,
                 fua=bool(flags & NBD_CMD_FLAG_FUA), fast=bool(flags & NBD_CMD_FLAG_FAST_ZERO))


def _cache(backend, req):
    backend.cache(req.offset, req.length)


def _block_status(backend, req):
    """The `base:allocation` descriptors (the loop builds the chunk: it knows the
    context id)."""
    extents = block_status_descriptors(backend.block_status(req.offset, req.length),
                                       one=bool(req.flags & NBD_CMD_FLAG_REQ_ONE))
    if not extents:
        raise OSError(errno.EIO, "backend returned no extents")
    return extents


# What each command runs once `check` passed it, and whether that may be on the event
# loop. READ and WRITE run as `fn(connection, req, backend)`: they try the loop first
# (nowait) and move off it themselves. The others block at the bottom of any data path
# (fdatasync, fallocate, SEEK_DATA) and always run on a worker, as `fn(backend, req)`;
# `Connection._finished` answers them. NBD_CMD_DISC has no entry: it is no I/O.
COMMANDS = {
    NBD_CMD_READ: (Connection._read, True),
    NBD_CMD_WRITE: (Connection._write_request, True),
    NBD_CMD_FLUSH: (_flush, False),
    NBD_CMD_TRIM: (_trim, False),
    NBD_CMD_WRITE_ZEROES: (_zero, False),
    NBD_CMD_CACHE: (_cache, False),
    NBD_CMD_BLOCK_STATUS: (_block_status, False),
}
