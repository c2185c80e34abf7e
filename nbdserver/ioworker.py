"""An I/O worker process: serves the connections the main process hands it.

    python -m nbdserver.ioworker --control-fd N   (started by nbdserver/iopool.py only)

It runs the same `server.Connection` transmission code on its own uvloop, with its own
read queue, worker threads and buffer budget, over its own `Export`s (one per disk it
serves), each opened from the main process's "open" message with the very constructors
the main process used (`crypto.open_disk` of the disk's `FileSpec`). Messages of one export are handled in
the order they came (a per-export lock: a connection never starts on a key that a
"stop" before it retired); those of different exports independently.

Hardened like the daemon (no core dumps, not dumpable, so no other user reads its
memory), and it never outlives the main process: PR_SET_PDEATHSIG kills it with its
parent, and an EOF on the control socket ends it too. The DEK arrives only over the
socketpair (never argv, environment or disk), is copied out of the receive buffer into
its own bytearray (locked in RAM by the cipher) and the buffer wiped; a "stop" wipes it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from collections import deque

from . import iowire
from .admission import ConnectionLimits
from .backend import FileSpec
from .crypto import open_disk
from .exports import Export, ExportCatalog
from .fipsmode import resume_in_worker
from .runtime import configure_logging, harden_process, raise_fd_limit, tune_allocator
from .server import NbdServer

log = logging.getLogger("nbdserver.ioworker")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STATS_INTERVAL = 1.0  # seconds between two reports of I/O counts: a scrape's staleness


class HeldExport:
    """One disk as this worker serves it."""

    def __init__(self):
        self.export: Export | None = None
        self.generation = 0  # of the main process's source it was opened from
        self.conns: set[int] = set()
        self.lock = asyncio.Lock()  # its messages, one after the other, in arrival order
        self.thaws: list[asyncio.Event] = []
        # Messages dispatched to this record and not yet handled: a stop may forget the
        # record only when it is the last, or a message queued behind it (an open, a
        # connection) would act on a record no later stop can reach (docs: revocation).
        self.pending = 0


class IoWorker:
    def __init__(self, ctrl: socket.socket, threads: int, budget: int):
        self.ctrl = ctrl
        self.receiver = iowire.Receiver(ctrl)
        self.server = NbdServer(ExportCatalog(), workers=threads,
                                limits=ConnectionLimits(buffer_budget=budget))
        self.held: dict[str, HeldExport] = {}
        self.done = asyncio.get_running_loop().create_future()
        self.grace = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._out: deque = deque()  # messages waiting for room in the control socket

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.ctrl.fileno(), self._readable)
        self._send({"t": "hello", "pid": os.getpid()})
        task = asyncio.ensure_future(self._ship_stats())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _ship_stats(self) -> None:
        """The I/O counts of each export, to the main process's metrics (nbdserver/iostats.py)."""
        while True:
            await asyncio.sleep(STATS_INTERVAL)  # a reporting period, not a synchronisation
            for held in list(self.held.values()):
                self._send_stats(held)

    def _send_stats(self, held: HeldExport) -> None:
        export = held.export
        taken = export.stats.take() if export is not None else None
        if export is not None and taken is not None:
            self._send({"t": "stats", "export": export.name, "stats": taken})

    def _send(self, header: dict) -> None:
        """Send now, or after what waits already: never dropped, as every answer is
        awaited there (a revocation of a thousand disks answers a thousand stops at once,
        more than the socket's buffer holds while the main process is busy locking)."""
        buffers = iowire.message(header)
        if not self._out:
            try:
                iowire.send(self.ctrl, buffers)
                return
            except BlockingIOError:
                pass
            except OSError:
                return  # the main process is gone; we follow it
        self._out.append(buffers)
        if len(self._out) == 1:
            asyncio.get_running_loop().add_writer(self.ctrl.fileno(), self._writable)

    def _writable(self) -> None:
        while self._out:
            try:
                iowire.send(self.ctrl, self._out[0])
            except BlockingIOError:
                return
            except OSError:
                self._out.clear()
                break
            self._out.popleft()
        asyncio.get_running_loop().remove_writer(self.ctrl.fileno())

    def _readable(self) -> None:
        while not self.done.done():
            try:
                got = self.receiver.receive()
            except BlockingIOError:
                return
            except (OSError, ValueError) as e:
                log.error("control socket: %s", e)
                got = None
            if got is None:  # the main process is gone
                self._finish(0.0)
                return
            header, tail, fds = got
            try:
                self._dispatch(header, tail, fds)
            finally:
                tail.release()
                self.receiver.wipe()  # it may have held a DEK

    def _dispatch(self, header: dict, tail: memoryview, fds: list[int]) -> None:
        """Take what the message carries out of the receive buffer now (it is wiped
        after this), then handle it in its export's order."""
        kind = header.get("t")
        if kind == "shutdown":
            self._finish(float(header.get("grace", 30.0)))
            return
        name = header["export"]
        if kind in ("conn", "open"):
            held = self.held.setdefault(name, HeldExport())
        else:
            found = self.held.get(name)
            if found is None:  # nothing of it here: nothing to stop, freeze or grow
                for fd in fds:
                    os.close(fd)
                if kind in ("stop", "freeze"):
                    self._send({"t": "done", "seq": header["seq"]})
                return
            held = found
        if kind == "conn":
            coro = self._conn(held, header, bytes(tail), fds[0])
            fds = fds[1:]
        elif kind == "open":
            coro = self._open(held, header, bytearray(tail) if header["encrypted"] else None)
        elif kind == "stop":
            coro = self._stop(held, header)
        elif kind == "freeze":
            coro = self._freeze(held, header)
        elif kind == "resize":
            coro = self._resize(held, header)
        elif kind == "thaw":
            if held.thaws:
                held.thaws.pop(0).set()
            return
        else:
            log.error("unknown control message %r", kind)
            coro = None
        for fd in fds:
            os.close(fd)
        if coro is not None:
            held.pending += 1
            task = asyncio.ensure_future(self._counted(held, coro))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    @staticmethod
    async def _counted(held: HeldExport, coro) -> None:
        try:
            await coro
        finally:
            held.pending -= 1

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("control message failed", exc_info=task.exception())

    # -- the messages
    async def _open(self, held: HeldExport, h: dict, key: bytearray | None) -> None:
        async with held.lock:
            try:
                backend = open_disk(FileSpec(**h["spec"]), key)
            except (OSError, ValueError, TypeError) as e:
                if key is not None:  # still ours when opening fails (open_disk's contract)
                    key[:] = bytes(len(key))
                log.error("export %s cannot be opened here: %s", h["export"], e)
                return
            export = held.export
            if export is None:
                export = held.export = Export(h["export"], backend, readonly=h["readonly"])
            else:
                if not export.locked:  # never stopped: its requests finish on the old key first
                    export.lock("key replaced")
                    await export.drained()
                    export.backend.close()
                export.unlock(backend)
            export.flags = h["flags"]  # exactly what the main process advertised
            held.generation = h["gen"]

    async def _conn(self, held: HeldExport, h: dict, leftover: bytes, fd: int) -> None:
        ident = h["id"]
        async with held.lock:
            export = held.export
            if export is None or export.locked or held.generation != h["gen"]:
                os.close(fd)  # its key was stopped meanwhile: the client reconnects
                self._send({"t": "ended", "id": ident})
                return
            sock = socket.socket(fileno=fd)
            try:
                conn = await self.server.adopt(sock, export, structured=h["structured"],
                                               min_block=h["min_block"], meta_id=h["meta_id"],
                                               size=h["size"], leftover=leftover)
            except OSError as e:
                log.info("connection %d could not be taken over: %s", ident, e)
                sock.close()
                self._send({"t": "ended", "id": ident})
                return
            held.conns.add(ident)
            conn.closed.add_done_callback(lambda _: self._ended(held, h["export"], ident))

    def _ended(self, held: HeldExport, name: str, ident: int) -> None:
        held.conns.discard(ident)
        self._send_stats(held)  # its last requests count before the main process hears it left
        self._send({"t": "ended", "id": ident})

    async def _stop(self, held: HeldExport, h: dict) -> None:
        """Lock, let in-flight requests finish, wipe the key; then answer."""
        async with held.lock:
            export = held.export
            if export is not None and not export.locked:
                export.lock("stopped by the main process")
                await export.drained()
                export.backend.close()  # XtsLayer: wipes the DEK
            # Forgotten only if nothing else is queued for it (pending counts this stop).
            if (export is not None and not held.conns and held.pending == 1
                    and self.held.get(h["export"]) is held):
                del self.held[h["export"]]
        self._send({"t": "done", "seq": h["seq"]})

    async def _resize(self, held: HeldExport, h: dict) -> None:
        """The disk grew (its file first): grow this copy in place, so connections sent
        after this message may use the new end; those served already keep their size."""
        async with held.lock:
            export = held.export
            if export is None or export.locked:
                return  # stopped: an open reads the file's size, grown by then
            try:
                export.backend.grow(h["size"])
            except OSError as e:  # never expected: the main process grew the file first
                log.error("export %s cannot grow here: %s", h["export"], e)

    async def _freeze(self, held: HeldExport, h: dict) -> None:
        async with held.lock:
            export = held.export
            thaw = asyncio.Event()
            held.thaws.append(thaw)
            if export is None:
                self._send({"t": "done", "seq": h["seq"]})
                return
            entered = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._hold_frozen(export, entered, thaw))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            await entered
        self._send({"t": "done", "seq": h["seq"]})

    @staticmethod
    async def _hold_frozen(export: Export, entered: asyncio.Future, thaw: asyncio.Event) -> None:
        async with export.frozen():
            entered.set_result(None)
            await thaw.wait()

    # -- the end
    def _finish(self, grace: float) -> None:
        if not self.done.done():
            self.grace = grace
            asyncio.get_running_loop().remove_reader(self.ctrl.fileno())
            self.done.set_result(None)

    async def run(self) -> None:
        self.start()
        await self.done
        await self.server.shutdown(self.grace)
        for held in self.held.values():
            for thaw in held.thaws:
                thaw.set()
            if held.export is not None:
                held.export.lock("worker exiting")
                held.export.backend.close()
        self.ctrl.close()


def die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:  # pragma: no cover
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the prctl took effect
        os._exit(1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nbdserver.ioworker")
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--buffer-budget", type=int, default=1 << 30)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--log-format", default="text")
    args = ap.parse_args(argv)
    die_with_parent(args.parent_pid)
    harden_process()
    raise_fd_limit()
    tune_allocator()
    configure_logging(args.log_level, args.log_format)
    resume_in_worker()  # a FIPS-mode server's engine provider, before any disk opens
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C goes to the main process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the main process says when (shutdown)
    ctrl = socket.socket(fileno=args.control_fd)
    ctrl.setblocking(False)

    async def run():
        await IoWorker(ctrl, args.threads, args.buffer_budget).run()

    try:
        import uvloop
        uvloop.run(run())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
