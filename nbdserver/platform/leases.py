"""One server per disk when several servers share one platform state (issue 15).

With the state in PostgreSQL (`nbdserver serve --state postgresql://...`) every server
sees every disk, and each could open any of them: two servers writing one file through
two XTS layers would each keep its own sector locks and caches, and interleave. So a
disk is served only by the holder of its lease, a row of `disk_leases` (state.py) with
an expiry:

- A client's attach takes the lease (`acquire`): granted if nobody holds it, its holder
  is this server, or the holder's has expired. Otherwise the client is refused, as for
  an unknown export, and finds the disk on the server that holds it.
- The holder renews all its leases every `ttl / 3` seconds. A disk whose lease another
  server took (after an expiry) is closed here at once (`DiskServing.unserve`).
- If renewals fail (the database unreachable), the holder closes every disk it serves
  once `FENCE` of the ttl has passed since its last successful renewal: before any other
  server may take them over, at `ttl` after that renewal.
- A disk that goes idle (serving.py) releases its lease at once, and a clean stop
  releases all of them once its disks are flushed and closed.
- A holder killed -9 renews nothing: its disks are free `ttl` seconds after its last
  renewal, at most, and the next client of each, on another server, takes it over.
  Failover time is therefore at most `ttl` plus the client's reconnect.

The expiry is compared with each server's own clock (`time.time()`): servers sharing a
platform must keep their clocks in step (NTP), and the bound grows by their skew.

Each server also follows in its export catalog, at every renewal, what other servers
changed (`sync_catalog`): a disk made on one is served by any, a disk deleted through
one is closed (and its storage removed) by the one serving it, a disk grown through one
is announced at its new size by the others. It looks at the disks only when their
generation moved (`State.disk_generation`, changed by every write of a disk's row), and
at least every `FULL_LOOK_EVERY` renewals whatever it says (a server of an older release
changes rows without it): with thousands of disks, listing them all every period held
the event loop, and every client's I/O, for a tenth of a second each time.

A server holds a lease of its own too (`server_leases`), renewed with its disks' and
released at a clean stop, and each volume it leaves CREATING names it (`volume_creators`,
state.py). A volume left CREATING is removed (`remove_abandoned`) only once its creator's
server lease has expired or is gone: at a start, and at each renewal of every server, so
restarting one server never removes a copy another is still making, and a dead server's
half-made volume is removed within a ttl and a renewal period. Operations the same way
(`operation_runners`): one is reported interrupted only once its server's lease is gone.
The sweep runs on the event loop, as every other use of the state's one connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING

from daemonkit.statedb import StateUnavailable

from .model import VolumeKind, VolumeState
from .oplog import INTERRUPTED
from .sealed import SealedBackend
from .serving import is_open

if TYPE_CHECKING:
    from .service import Platform
    from .state import State
    from .storage import VolumeStorage

log = logging.getLogger("nbdserver.platform")

DISK_LEASE = 15.0  # seconds; `nbdserver serve --disk-lease-seconds`
FENCE = 2 / 3  # of the ttl since the last renewal: then stop serving, before it can expire
FULL_LOOK_EVERY = 12  # renewals: a minute at the default ttl


class DiskLeases:
    def __init__(self, platform: Platform, ttl: float = DISK_LEASE):
        self.platform = platform
        self.state = platform.state
        self.ttl = ttl
        # Unique per process, readable in the table: which host and process holds a disk.
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.held: set[str] = set()
        self._last_renewal = time.monotonic()
        self._task: asyncio.Task | None = None
        self._removals: set[asyncio.Future] = set()  # referenced until done
        # The disks' files at the last look (sync_catalog): what another server changed
        # since; and the disks' generation then (None: look at the next renewal).
        self._seen = {name: path for name, (path, state, _) in self.state.disk_rows().items()
                      if state is VolumeState.READY}
        self._generation: int | None = None
        self._rounds = 0
        # Before any volume is made here: the volumes this server leaves CREATING are its.
        self.state.renew_server_lease(self.holder, time.time(), ttl)
        self.state.creator = self.holder

    def acquire(self, name: str) -> bool:
        """Whether this server holds `name`'s lease now. With the database unreachable
        nobody can be granted one, so the client is refused as for a disk another server
        serves, and may retry."""
        try:
            taken = self.state.take_lease(name, self.holder, time.time(), self.ttl)
        except StateUnavailable as e:
            log.warning("disk %s not opened: its lease cannot be taken: %s", name, e)
            return False
        if taken:
            self.held.add(name)
            return True
        return False

    def release(self, name: str) -> None:
        self.held.discard(name)
        try:
            self.state.release_lease(name, self.holder)
        except StateUnavailable as e:  # it expires by itself
            log.warning("lease of disk %s not released: %s", name, e)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for name in list(self.held):
            try:
                self.release(name)
            except Exception:  # the lease then expires by itself
                log.warning("lease of disk %s not released", name, exc_info=True)
        try:
            self.state.release_server_lease(self.holder)
        except Exception:
            log.warning("server lease not released (it expires by itself)", exc_info=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            self.renew()
            try:
                self.sync_catalog()
                remove_abandoned(self.state, self.platform.storage)
                swept = self.state.interrupt_running_operations(time.time(), INTERRUPTED)
                if swept:
                    log.warning("%d operation(s) of a server that stopped reported as "
                                "interrupted", swept)
            except StateUnavailable as e:  # renew() said it already; the next round retries
                log.debug("the other servers' changes not looked up: %s", e)
            except Exception:
                log.warning("the other servers' changes not looked up", exc_info=True)

    async def _remove_storage(self, location: str, closing: list[asyncio.Task]) -> None:
        await asyncio.gather(*closing, return_exceptions=True)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self.platform.storage.remove, location)
        except OSError as e:  # a stray then, removed at a server's next start
            log.error("cannot remove %s of a disk deleted through another server: %s", location, e)

    def renew(self) -> None:
        try:
            now = time.time()
            self.state.renew_server_lease(self.holder, now, self.ttl)
            still = self.state.renew_leases(self.holder, now, self.ttl)
        except Exception as e:
            late = time.monotonic() - self._last_renewal
            log.warning("disk leases not renewed for %.1f s: %s", late, e)
            lost = set(self.held) if late > FENCE * self.ttl else set()
        else:
            self._last_renewal = time.monotonic()
            lost = self.held - still
        for name in lost:
            self.held.discard(name)
            log.warning("disk %s: lease lost, closed here (another server may serve it)", name)
            self.platform.unserve(name, "lease lost")

    def sync_catalog(self) -> int:
        """Follow in the export catalog what other servers changed in the state; how many
        disks were added. A disk created elsewhere is exported; one deleted elsewhere (its
        row gone, or now naming another file: deleted and made again) is closed at once,
        its clients' requests failing from then on, and unexported; one grown elsewhere
        (its storage grown by that server) is served at its new size to the clients that
        attach from then on, as a local resize does. Moves and re-wraps change no DEK,
        and revocations reach every server from the key service: nothing to do here."""
        self._rounds += 1
        # Read before the rows: a change committed after this read moves it again, and
        # the next renewal looks then.
        generation = self.state.disk_generation()
        if generation == self._generation and self._rounds % FULL_LOOK_EVERY:
            return 0
        catalog = self.platform.catalog
        disks = self.state.disk_rows()
        for name, path in self._seen.items():
            export = catalog.get(name)
            now = disks.get(name)
            if export is None or (now is not None and now[0] == path):
                continue
            log.warning("disk %s deleted through another server: closed here", name)
            closing = self.platform.close_disks([name], "disk deleted")  # locked at once
            catalog.remove(name)
            if name in self.held:
                self.release(name)
            # The deleting server could not remove an image this one held open (librbd
            # refuses while a watch is on it): removed here once closed. A file it unlinked.
            removal = asyncio.ensure_future(self._remove_storage(path, closing))
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)
        added = 0
        for name, (path, state, size) in disks.items():
            if state is not VolumeState.READY:
                continue
            export = catalog.get(name)
            if export is None:
                disk = self.state.get_volume(VolumeKind.DISK, name)  # the whole row: new here
                if disk is not None and disk.state is VolumeState.READY:
                    self.platform._export_disk(disk)
                    added += 1
            elif size > export.backend.size and self._seen.get(name) == path:
                log.info("disk %s grown through another server to %d bytes", name, size)
                if is_open(export):
                    export.grow(size)
                else:
                    export.backend = SealedBackend(size)
        self._seen = {name: path for name, (path, state, _) in disks.items()
                      if state is VolumeState.READY}
        self._generation = generation
        return added


def remove_abandoned(state: State, storage: VolumeStorage) -> int:
    """Remove each volume left CREATING by a server that is gone (state.py's
    `unfinished_volumes`: with one server alone, every one) and its file or image; how
    many. One whose storage cannot be removed now stays, for the next sweep."""
    now = time.time()
    removed = 0
    for v in state.unfinished_volumes(now):
        log.warning("removing %s %s left unfinished by a crash", v.kind.value, v.name)
        try:
            storage.remove(v.path)
        except OSError as e:  # an image, the cluster unreachable: next sweep
            log.error("cannot remove %s: %s", v.path, e)
            continue
        state.delete_volume(v.kind, v.name)
        removed += 1
    state.forget_server_leases(now)
    return removed
