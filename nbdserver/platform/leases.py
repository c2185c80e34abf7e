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

Each server also adds to its export catalog, at every renewal, the disks another server
created since (`sync_catalog`), so a disk made on one is served by any.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING

from .model import VolumeKind, VolumeState

if TYPE_CHECKING:
    from .service import Platform

log = logging.getLogger("nbdserver.platform")

DISK_LEASE = 15.0  # seconds; `nbdserver serve --disk-lease-seconds`
FENCE = 2 / 3  # of the ttl since the last renewal: then stop serving, before it can expire


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

    def acquire(self, name: str) -> bool:
        if self.state.take_lease(name, self.holder, time.time(), self.ttl):
            self.held.add(name)
            return True
        return False

    def release(self, name: str) -> None:
        self.held.discard(name)
        self.state.release_lease(name, self.holder)

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

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            self.renew()
            try:
                self.sync_catalog()
            except Exception:
                log.warning("disks of the other servers not looked up", exc_info=True)

    def renew(self) -> None:
        try:
            still = self.state.renew_leases(self.holder, time.time(), self.ttl)
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
        """Export the ready disks another server created since; how many."""
        added = 0
        for disk in self.state.list_volumes(VolumeKind.DISK):
            if disk.state is VolumeState.READY and self.platform.catalog.get(disk.name) is None:
                self.platform._export_disk(disk)
                added += 1
        return added
