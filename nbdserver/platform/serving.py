"""Serving disks: a DEK is in memory only while a client uses its disk.

One of the parts `Platform` is built from (see `service`), and the export catalog's `opener`. A disk's export
is in one of these states (the catalog's `Export` holds them):

- *unattached*: available, its backend sealed (no DEK in memory). A client's
  NBD_OPT_GO / NBD_OPT_EXPORT_NAME opens it (`attach`): unwrap, then an `XtsLayer` over
  the file. NBD_OPT_INFO and NBD_OPT_LIST open nothing.
- *attached*: open, with at least one connection in transmission.
- *idle*: open, no connection left; after `idle_close` seconds (0: at once) the DEK is
  flushed and wiped and the disk is unattached again. A client that attaches meanwhile
  keeps it open.
- *locked*: the key was refused (revoked) or unreachable past the grace period: sealed,
  I/O fails with EIO, new clients are refused like an unknown export.

A close (idle or revocation) seals the export before its first await, then drains,
flushes and wipes (`_retire`); an open of the same disk waits for that retirement before
it puts a new layer over the file, so a write of a closing connection is never passed by
one of the next (each layer has its own sector locks).

Nothing here takes a lock or a claim (docs/architecture.md, "Lock discipline"): an open
installs its DEK only if the export still holds the sealed backend it saw (every close
installs a new one) and is not locked; otherwise it wipes what it unwrapped.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import TYPE_CHECKING

from ..backend import WRITEBACK, FileSpec
from ..crypto import InvalidKey, open_disk
from ..exports import Export, ExportSource
from . import backing, keys
from .errors import AccessMissing, KeyUnavailable
from .model import Volume, VolumeKind
from .sealed import SealedBackend
from .storage import open_volume

if TYPE_CHECKING:
    from ..exports import ExportCatalog
    from ..rbdbackend import RbdSpec
    from .access import KeyAccess
    from .leases import DiskLeases
    from .scopes import KeyScopes
    from .state import State
    from .storage import VolumeStorage

log = logging.getLogger("nbdserver.platform")

# Unwraps in flight at once when many disks open together (a re-enabled key, clients
# reconnecting after a restart): the key service answers 16 concurrent calls about 40%
# faster than one at a time, and more buy little while each costs a socket.
UNWRAP_CONCURRENCY = 16
# Seconds an open disk with no connection keeps its DEK: a client that reconnects (a
# reboot, a remount) finds it open. `nbdserver serve --idle-close-seconds`.
IDLE_CLOSE = 60.0
SERVER_STOPPING = "server stopping"  # the reason of the closes at a routine stop


def is_open(export: Export) -> bool:
    """The export holds a DEK (attached or idle)."""
    return not isinstance(export.backend, SealedBackend)


class DiskServing:
    """Opens and closes disks. It reads volumes from `state`, unwraps with the key
    service client of a volume's scope (`scopes`), opens files or images from `storage` with
    `default_cache` for a disk without its own mode, and installs itself as `catalog`'s
    opener. `use_key_access` and `use_leases` wire what is built after it."""

    def __init__(self, state: State, catalog: ExportCatalog, storage: VolumeStorage,
                 scopes: KeyScopes, *, idle_close: float = IDLE_CLOSE,
                 default_cache: str = WRITEBACK):
        self.state = state
        self.catalog = catalog
        self.storage = storage
        self.scopes = scopes
        self.idle_close = idle_close
        self.default_cache = default_cache  # `nbdserver serve --cache`
        self._unwraps = asyncio.Semaphore(UNWRAP_CONCURRENCY)
        self._opening: dict[Export, asyncio.Future] = {}
        self._retiring: dict[Export, asyncio.Future] = {}
        self._idle_timers: dict[Export, asyncio.TimerHandle] = {}
        # The revocation watcher to tell when a key is refused at an open; None: nobody.
        self.access: KeyAccess | None = None
        # Several servers on one state (leases.py): a disk is opened only by the holder
        # of its lease. None: this server alone serves the platform.
        self.leases: DiskLeases | None = None
        catalog.opener = self

    def use_key_access(self, access: KeyAccess) -> None:
        self.access = access

    def use_leases(self, leases: DiskLeases) -> None:
        self.leases = leases

    def disk_spec(self, disk: Volume) -> FileSpec | RbdSpec:
        """How the disk's file or image is opened: a file with its own cache mode, or
        the server's default."""
        return self.storage.spec(disk.path, cache=disk.cache or self.default_cache)

    def export_disk(self, disk: Volume) -> Export:
        """Put a disk in the catalog, unattached: nothing is unwrapped."""
        from .volumes import describe_disk
        export = Export(disk.name, SealedBackend(disk.size), description=describe_disk(disk))
        self.catalog.add(export)
        return export

    def opening(self, export: Export) -> asyncio.Future | None:
        """The open of `export` in progress (a client's attach unwrapping its key), if any."""
        return self._opening.get(export)

    # -- the catalog's opener
    async def attach(self, export: Export) -> bool:
        """A client selected the disk: open it if it is not (False: refuse the client)."""
        self._cancel_idle(export)
        if export.locked:
            return False
        if is_open(export):
            return True
        if self.leases is not None and not self.leases.acquire(export.name):
            return False  # another server serves it: refused like an unknown export
        return await self._open_shared(export)

    def detached(self, export: Export) -> None:
        """The last connection left: close after the idle window."""
        self._cancel_idle(export)
        if self.catalog.get(export.name) is not export or not is_open(export):
            return
        if self.idle_close <= 0:
            self._close_idle(export)
        else:
            self._idle_timers[export] = asyncio.get_running_loop().call_later(
                self.idle_close, self._close_idle, export)

    def _cancel_idle(self, export: Export) -> None:
        h = self._idle_timers.pop(export, None)
        if h is not None:
            h.cancel()

    def _close_idle(self, export: Export) -> None:
        self._idle_timers.pop(export, None)
        if export.clients or export.locked or not is_open(export):
            return
        backend = export.backend
        export.replace_backend(SealedBackend(backend.size))  # unattached: sealed, not locked
        self._start_retire(export, backend, "no client attached", idle=True)
        if self.leases is not None:
            self.leases.release(export.name)  # another server may serve it at once

    def unserve(self, name: str, reason: str) -> None:
        """Its lease is gone (another server may serve it now, leases.py): close it here
        at once, unlocked, so this server opens it again if it gets the lease back.
        Requests of clients still connected fail from now on."""
        export = self.catalog.get(name)
        if export is None or not is_open(export):
            return
        self._cancel_idle(export)
        backend = export.backend
        export.replace_backend(SealedBackend(backend.size))
        self._start_retire(export, backend, reason)

    # -- opening
    async def _open_shared(self, export: Export) -> bool:
        """One open per disk at a time: clients selecting it together share it."""
        task = self._opening.get(export)
        if task is None:
            task = self._opening[export] = asyncio.ensure_future(self._open(export))
            task.add_done_callback(lambda t: self._opening.pop(export, None) if
                                   self._opening.get(export) is t else None)
        return await asyncio.shield(task)

    async def _open(self, export: Export) -> bool:
        """Unwrap the disk's DEK and put an XtsLayer over its file. The export must still
        be the catalog's, with the sealed backend seen here, when the DEK arrives."""
        retiring = self._retiring.get(export)
        if retiring is not None:
            await asyncio.shield(retiring)
        disk = self.state.get_volume(VolumeKind.DISK, export.name)
        if disk is None or is_open(export):
            return disk is not None and not export.locked
        failed = backing.problem(disk.path, disk.size)
        if failed is not None:  # refused before the key service is asked for anything
            log.warning("disk %s failed: %s", export.name, failed)
            return False
        sealed, was_locked = export.backend, export.locked
        try:
            async with self._unwraps:
                # Both DEKs of a double-encrypted disk, as one buffer (keys.unwrap_volume).
                dek = await keys.unwrap_volume(self.scopes.client_for, disk)
        except AccessMissing as e:
            if self.catalog.get(export.name) is export and export.backend is sealed:
                export.lock(e.message)  # later clients are refused at once; a recheck reopens
                if self.access is not None:
                    self.access.cause[export.name] = "revoked"
                    self.access.poke(disk.des)
            log.warning("disk %s stays closed: %s", export.name, e.message)
            return False
        except KeyUnavailable as e:
            log.warning("disk %s cannot be opened: %s", export.name, e.message)
            return False
        if (self.catalog.get(export.name) is not export or export.backend is not sealed
                or export.locked != was_locked):
            keys.wipe(dek)  # closed, locked or deleted meanwhile: fail closed
            return False
        try:
            # Inside: an RBD disk on a server without a cluster is an OSError too (storage.py).
            spec = self.disk_spec(disk)
            if isinstance(spec, FileSpec):
                layer = open_disk(spec, dek)
            else:
                # An RBD image: a round trip to the cluster, and its exclusive lock, which
                # takes seconds when the last holder died (rbdbackend.py): not on the loop.
                layer = await asyncio.get_running_loop().run_in_executor(None, open_volume, spec, dek)
        # OSError: the file went with a delete that committed meanwhile. InvalidKey: the key
        # service answered a DEK the engine refuses (equal halves): faulty or hostile.
        except (OSError, InvalidKey) as e:
            keys.wipe(dek)
            log.warning("disk %s cannot be opened: %s", export.name, e)
            return False
        if not isinstance(spec, FileSpec) and (self.catalog.get(export.name) is not export
                                               or export.backend is not sealed
                                               or export.locked != was_locked):
            layer.close()  # wipes the DEK it owns; closed, locked or deleted meanwhile
            return False
        # The I/O workers open the same file with the same key (the layer owns `dek`
        # and wipes it in place when it closes).
        export.unlock(layer, ExportSource(spec, key=dek))
        log.info("disk %s opened (key %s)", export.name, disk.envelope.kid)
        return True

    async def open_disk(self, name: str) -> bool:
        """Serve a locked disk again (its key answered): an attached disk is opened (a
        fresh unwrap); an unattached one only unlocks, as it holds no DEK."""
        export = self.catalog.get(name)
        if export is None or self.state.get_volume(VolumeKind.DISK, name) is None:
            return False
        if not export.locked:
            return True
        if not export.clients:
            if not is_open(export):
                export.unlock()
            return not export.locked
        opened = await self._open_shared(export)
        if opened and not export.clients:
            self.detached(export)  # its clients left while it opened: the idle window
        return opened

    async def open_disks(self, names) -> int:
        """Open many locked disks; unwraps are bounded by UNWRAP_CONCURRENCY in flight
        over the whole platform (`_open`). Returns how many serve."""
        names = list(names)
        results = await asyncio.gather(*(self.open_disk(n) for n in names), return_exceptions=True)
        for name, r in zip(names, results, strict=True):
            if isinstance(r, Exception):
                log.error("disk %s: opening failed: %r", name, r)
        return sum(r is True for r in results)

    # -- closing
    def close_disks(self, names, reason: str) -> list[asyncio.Task]:
        """Lock every named disk now, with nothing awaited between one lock and the next,
        then drain, flush and wipe them all at once. Returns the tasks of the drains
        (each wipes its DEK when its disk's last in-flight request ends); they run to
        their end whoever waits for them.

        No garbage collection runs among the locks: each lock allocates, and a full
        collection that fell between two of them held the later locks back by its whole
        pause (65 to 73 ms with 5,000 disks here). It runs after the last one instead."""
        retiring = []
        collecting = gc.isenabled()
        gc.disable()
        try:
            for name in names:
                export = self.catalog.get(name)
                if export is None:
                    continue
                self._cancel_idle(export)
                backend = self._seal(export, reason)
                if backend is not None:
                    retiring.append((export, backend))
        finally:
            if collecting:
                gc.enable()
        return [self._start_retire(e, b, reason) for e, b in retiring]

    async def close_disk(self, name: str, reason: str, export: Export | None = None) -> None:
        """Lock the export, let in-flight requests finish, flush, wipe the DEK.

        Locking is immediate (before the first await): new requests fail with EIO from
        here on, whatever the rest waits for. The rest runs to its end even if the caller
        is cancelled: a DEK is never left unwiped behind a locked export."""
        export = export or self.catalog.get(name)
        if export is None:
            return
        self._cancel_idle(export)
        backend = self._seal(export, reason)
        retiring = self._start_retire(export, backend, reason) if backend is not None \
            else self._retiring.get(export)
        if retiring is not None:
            await asyncio.shield(retiring)

    @staticmethod
    def _seal(export: Export, reason: str):
        """Lock `export` and put a sealed backend in; the backend it had, if it held a DEK."""
        backend = export.backend
        export.lock(reason)
        export.backend = SealedBackend(backend.size)
        return None if isinstance(backend, SealedBackend) else backend

    def _start_retire(self, export: Export, backend, reason: str, *, idle: bool = False):
        previous = self._retiring.get(export)
        task = asyncio.ensure_future(self._retire(export, backend, reason, idle, previous))
        self._retiring[export] = task
        task.add_done_callback(lambda t: self._retiring.pop(export, None) if
                               self._retiring.get(export) is t else None)
        return task

    async def _retire(self, export: Export, backend, reason: str, idle: bool, previous) -> None:
        if previous is not None:  # one retirement after another: a later open waits for both
            await asyncio.shield(previous)
        # This process's requests and every I/O worker's (each wipes its copy of the key
        # when its own have finished; a dead worker's copy went with it).
        await asyncio.gather(export.drained(), export.copies_stopped())
        try:
            await asyncio.get_running_loop().run_in_executor(None, backend.flush)
        except (OSError, ValueError) as e:
            log.error("disk %s: flush on close failed: %s", export.name, e)
        backend.close()
        if idle or reason == SERVER_STOPPING:  # routine: not a warning
            log.info("disk %s closed, DEK wiped: %s", export.name, reason)
        else:
            log.warning("disk %s locked, DEK wiped: %s", export.name, reason)

    async def stop(self) -> None:
        for h in self._idle_timers.values():
            h.cancel()
        self._idle_timers.clear()
        for export in list(self.catalog):
            await self.close_disk(export.name, SERVER_STOPPING, export)
        if self._retiring:
            await asyncio.gather(*self._retiring.values(), return_exceptions=True)
        if self.leases is not None:  # every disk flushed and closed: others may serve them now
            await self.leases.stop()
