"""I/O worker processes: the NBD data path on every core.

The main process keeps everything before transmission: accept, admission, the handshake
(TLS included), what a client may see, open on attach with its DEK unwrap. When a plain
TCP connection enters transmission, `Connection._hand_off` (nbdserver/server.py) gives
its socket to `IoPool.hand_off`, which sends it to the worker serving the fewest
connections (`python -m nbdserver.ioworker`, one socketpair each, nbdserver/iowire.py),
with the negotiated parameters and the bytes read past the handshake. Before the first
connection of an export's current key, the worker gets an "open": the file, and the
DEK. Processes, not threads: the per-request work is Python, and threads would queue
for the one GIL (free-threaded Python is not available here).

The export stays this process's to rule (nbdserver/exports.py): the pool is every
handed export's `copies` and fans each state change out to the workers holding it.

- A lock (revocation, delete) or an idle close sends "stop": the worker locks its copy
  (EIO from then on), lets its in-flight requests finish, wipes its DEK, answers;
  `stopped` waits for those answers, so the platform's drain covers every process.
- An unlock with a new key sends "open" to the workers that still hold connections.
- A grow (an online resize) sends "resize": the worker grows its copy in place, and
  its connections keep the size they negotiated.
- A freeze (snapshot) sends "freeze" and waits until every worker holding the export
  has drained and holds new requests; "thaw" lets them go. A connection that reaches
  transmission during a freeze is served here, where the freeze holds it too.
- A worker's connection counts as attached, and under the admission caps, here until
  the worker reports its end ("ended"); a worker left with no connection of an export
  is told to stop it, so a DEK lives in a worker only while it serves that disk.
- A worker that dies takes its connections (clients reconnect); its records here are
  dropped (no leaked attachment or admission count), its answers owed are given up
  (its memory, DEKs included, is gone) and a new worker is started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque

from daemonkit.logsetup import current_format

from . import iowire
from .backend import FileSpec
from .exports import Export, ExportCatalog

log = logging.getLogger("nbdserver.iopool")

# A worker that dies at once again is started again at most this often: a broken
# installation must not turn into a fork loop.
RESPAWN_INTERVAL = 1.0
# Seconds a worker may take to finish its requests at shutdown beyond the server's grace.
EXIT_MARGIN = 5.0


def default_processes() -> int:
    """One I/O worker per core (`--io-processes`; 0 or 1: serve in the main process)."""
    return os.cpu_count() or 1


class RemoteConnection:
    """A connection served by a worker, as this process counts it: the key of the
    export's attachment, and a place under the admission caps."""

    __slots__ = ("id", "worker", "export", "peer_key")

    def __init__(self, ident: int, worker: Worker, export: Export, peer_key: str | None):
        self.id, self.worker, self.export, self.peer_key = ident, worker, export, peer_key


class Worker:
    """One I/O worker process and its control socket, seen from the main process."""

    def __init__(self, pool: IoPool, index: int):
        self.pool = pool
        self.index = index
        self.ready = False
        self.pid: int | None = None
        self.conns: dict[int, RemoteConnection] = {}
        self.holdings: dict[str, int] = {}  # export name -> generation of the key it was sent
        self.owed: dict[int, asyncio.Future] = {}  # answers awaited, by sequence number
        self._out: deque = deque()  # (buffers, fds) waiting for room in the socket
        self._writing = False
        self.started = time.monotonic()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = parent
        parent.setblocking(False)
        try:
            self.proc = subprocess.Popen(
                # -P: the working directory is not put on the import path, so a module
                # planted there cannot stand in for ours and receive the disks' keys.
                [sys.executable, "-P", "-m", "nbdserver.ioworker", "--control-fd", str(child.fileno()),
                 "--parent-pid", str(os.getpid()),
                 "--threads", str(pool.threads), "--buffer-budget", str(pool.budget_share),
                 "--log-level", logging.getLevelName(logging.getLogger().level),
                 "--log-format", current_format()],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self.pid = self.proc.pid
        self.receiver = iowire.Receiver(parent)
        asyncio.get_running_loop().add_reader(parent.fileno(), self._readable)

    # -- sending: in order, never blocking the loop
    def send(self, header: dict, *tail, fds=()) -> None:
        buffers = iowire.message(header, *tail)
        if not self._out:
            try:
                iowire.send(self.sock, buffers, fds)
            except BlockingIOError:
                pass
            except OSError:  # the worker is gone: its EOF is on the way
                self._close_fds(fds)
                return
            else:
                self._close_fds(fds)
                return
        self._out.append((buffers, fds))
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        while self._out:
            buffers, fds = self._out[0]
            try:
                iowire.send(self.sock, buffers, fds)
            except BlockingIOError:
                return
            except OSError:
                break
            self._out.popleft()
            self._close_fds(fds)
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
        while self._out:
            self._close_fds(self._out.popleft()[1])

    @staticmethod
    def _close_fds(fds) -> None:
        for fd in fds:
            os.close(fd)

    def ask(self, header: dict) -> asyncio.Future:
        """Send a message that the worker answers; the future is its answer."""
        seq = next(self.pool.seqs)
        fut = asyncio.get_running_loop().create_future()
        self.owed[seq] = fut
        self.send({**header, "seq": seq})
        return fut

    # -- receiving
    def _readable(self) -> None:
        while True:
            try:
                got = self.receiver.receive()
            except BlockingIOError:
                return
            except (OSError, ValueError) as e:
                log.error("I/O worker %s: control socket: %s", self.pid, e)
                got = None
            if got is None:
                self.pool.lost(self)
                return
            header, _, fds = got
            self._close_fds(fds)  # a worker sends none
            kind = header.get("t")
            if kind == "hello":
                self.ready = True
                log.info("I/O worker %s ready", self.pid)
            elif kind == "ended":
                self.pool.ended(self, header["id"])
            elif kind == "stats":  # I/O counted there, for the metrics (nbdserver/iostats.py)
                export = self.pool.catalog.get(header["export"])
                if export is not None:
                    export.stats.merge(header["stats"])
            elif kind == "done":
                fut = self.owed.pop(header["seq"], None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            else:
                log.error("I/O worker %s: unknown message %r", self.pid, kind)

    def close(self) -> None:
        """Forget the process (it exited or is killed): every answer owed is given up."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self._stop_writing()
        self.sock.close()
        for fut in self.owed.values():
            if not fut.done():
                fut.set_result(None)
        self.owed.clear()


class IoPool:
    """The I/O worker processes, and every handed export's `copies` (see the module
    docstring). Made and started on the event loop."""

    def __init__(self, processes: int, catalog: ExportCatalog, *, admission, buffer_budget: int,
                 threads: int = 8):
        if processes < 2:
            raise ValueError("an I/O pool needs at least 2 processes (1: serve in-process)")
        self.size = processes
        self.catalog = catalog
        self.admission = admission
        self.threads = threads
        self.budget_share = max(64 << 20, buffer_budget // processes)
        self.workers: list[Worker] = []
        self.seqs = itertools.count(1)
        self._ids = itertools.count(1)
        self._frozen: dict[object, list[Worker]] = {}  # a freeze's token -> the workers it froze
        self._stops: dict[Export, list[asyncio.Future]] = {}
        self.closing = False
        self._respawns: set[asyncio.TimerHandle] = set()
        self._all_gone: asyncio.Future | None = None  # made by shutdown

    def start(self) -> None:
        self.workers = [Worker(self, i) for i in range(self.size)]

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    # -- the server's hook
    def hand_off(self, fd: int, conn, export: Export, negotiated, meta_id, leftover: bytes,
                 peer_key: str | None) -> bool:
        """Send a connection in transmission to a worker; False: serve it here."""
        source = export.source
        ready = [w for w in self.workers if w.ready]
        if (self.closing or source is None or not ready or len(leftover) > iowire.MAX_LEFTOVER
                or not isinstance(source.spec, FileSpec)):  # a worker opens files only
            return False
        worker = min(ready, key=lambda w: len(w.conns))
        if worker.holdings.get(export.name) != export.generation:
            self._open(worker, export, source)
        try:
            dup = os.dup(fd)
        except OSError as e:
            log.warning("cannot hand a connection over: %s", e)
            return False
        ident = next(self._ids)
        worker.send({"t": "conn", "id": ident, "export": export.name, "gen": export.generation,
                     "structured": negotiated.structured_replies, "min_block": negotiated.min_block,
                     "meta_id": meta_id, "size": negotiated.export.size}, leftover, fds=(dup,))
        remote = RemoteConnection(ident, worker, export, peer_key)
        worker.conns[ident] = remote
        self.catalog.transfer(export, conn, remote)
        export.copies = self
        return True

    def _open(self, worker: Worker, export: Export, source) -> None:
        # The file as it is now (no resizing), by a path that does not depend on a cwd.
        spec = {**dataclasses.asdict(source.spec), "size": None,
                "path": os.path.abspath(source.spec.path)}
        header = {"t": "open", "export": export.name, "gen": export.generation, "spec": spec,
                  "readonly": export.readonly, "flags": export.flags,
                  "encrypted": source.key is not None}
        if source.key is not None:
            worker.send(header, memoryview(source.key))
        else:
            worker.send(header)
        worker.holdings[export.name] = export.generation

    def ended(self, worker: Worker, ident: int) -> None:
        remote = worker.conns.pop(ident, None)
        if remote is None:
            return
        self._forget(remote)
        export = remote.export
        if not any(r.export is export for r in worker.conns.values()):
            self._stop_on(worker, export)  # no DEK where no client of its disk is

    def _forget(self, remote: RemoteConnection) -> None:
        if remote.peer_key is not None:
            self.admission.release(remote.peer_key)
            remote.peer_key = None
        self.catalog.detach(remote.export, remote)

    # -- ExportCopies
    def opened(self, export: Export) -> None:
        source = export.source
        if source is None:
            return
        for w in self.workers:
            if any(r.export is export for r in w.conns.values()):
                self._open(w, export, source)

    def stop(self, export: Export) -> None:
        for w in self.workers:
            self._stop_on(w, export)

    def _stop_on(self, worker: Worker, export: Export) -> None:
        if worker.holdings.pop(export.name, None) is None:
            return
        fut = worker.ask({"t": "stop", "export": export.name})
        stops = self._stops.setdefault(export, [])
        stops.append(fut)
        fut.add_done_callback(lambda f: self._stop_done(export, f))

    def _stop_done(self, export: Export, fut) -> None:
        stops = self._stops.get(export)
        if stops is not None:
            stops.remove(fut)
            if not stops:
                del self._stops[export]

    async def stopped(self, export: Export) -> None:
        stops = list(self._stops.get(export, ()))
        if stops:
            await asyncio.gather(*stops)

    async def freeze(self, export: Export, token: object) -> None:
        holders = [w for w in self.workers if export.name in w.holdings]
        self._frozen[token] = holders  # before the first await: a cancelled freeze still thaws
        await asyncio.gather(*(w.ask({"t": "freeze", "export": export.name}) for w in holders))

    def thaw(self, export: Export, token: object) -> None:
        holders = self._frozen.pop(token, [])
        for w in holders:
            if w in self.workers:
                w.send({"t": "thaw", "export": export.name})

    def grown(self, export: Export) -> None:
        """The disk grew: each worker holding it grows its copy, before any connection
        sent after this (one socket, read in order), so a connection told the new size
        never reaches a copy of the old. A worker that opens it later opens the file as
        it is (`_open`), grown already."""
        for w in self.workers:
            if export.name in w.holdings:
                w.send({"t": "resize", "export": export.name, "size": export.backend.size})

    # -- workers' ends
    def lost(self, worker: Worker) -> None:
        """A worker's control socket closed: it exited or was killed."""
        if worker not in self.workers:
            return
        worker.close()
        code = worker.proc.poll()
        if not self.closing:
            log.error("I/O worker %s exited (%s); its %d connection(s) are gone, starting another",
                      worker.pid, code if code is not None else "status unknown", len(worker.conns))
        for remote in list(worker.conns.values()):
            self._forget(remote)
        worker.conns.clear()
        worker.holdings.clear()
        asyncio.get_running_loop().run_in_executor(None, worker.proc.wait)  # reap it
        if self.closing:
            self.workers.remove(worker)
            if not self.workers and self._all_gone is not None and not self._all_gone.done():
                self._all_gone.set_result(None)
            return
        delay = max(0.0, RESPAWN_INTERVAL - (time.monotonic() - worker.started))
        handle = asyncio.get_running_loop().call_later(delay, self._respawn, worker)
        self._respawns.add(handle)

    def _respawn(self, old: Worker) -> None:
        if self.closing or old not in self.workers:
            return
        try:
            new = Worker(self, old.index)
        except OSError as e:
            log.error("cannot start an I/O worker: %s", e)
            new = None
        i = self.workers.index(old)
        if new is None:
            self.workers.pop(i)
        else:
            self.workers[i] = new

    async def shutdown(self, grace: float) -> None:
        """Every worker finishes its requests (within `grace`) and exits; killed after."""
        self.closing = True
        for h in self._respawns:
            h.cancel()
        for w in self.workers:
            w.send({"t": "shutdown", "grace": grace})
        loop = asyncio.get_running_loop()
        self._all_gone = loop.create_future()
        if self.workers:  # each one's EOF removes it (lost)
            await asyncio.wait([self._all_gone], timeout=grace + EXIT_MARGIN)
        for w in list(self.workers):
            try:
                w.proc.kill()
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
            await loop.run_in_executor(None, w.proc.wait)
            self.lost(w)
