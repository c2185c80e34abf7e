"""A disk's size over its life: grow it (`resize_disk`), and how much of it is stored
(`disk_usage`). A mixin of `Platform` (see `service`).

Growing is a truncate of the sparse file, which adds holes, and the encryption layer
reads a hole as zeros: no byte is written and nothing is re-encrypted. Shrinking is
refused: the data past the new end would be lost, and a file system on the disk does
not expect its device to get smaller under it.

A disk grows while no NBD client is attached. A client negotiated its export's size at
its handshake (NBD doc/proto.md, NBD_INFO_EXPORT), and the open encryption layer and
the I/O workers' copies of it hold the file at that size; so a disk with clients, or
one a client is attaching to, is refused (409), and one idle with its key still loaded
(its idle timer running) is closed first, its key wiped as at the end of that window.
Everything from the check to the new size in the state and the catalog happens without
an await, so no client can attach in between; the next client opens the disk at its new
size and is told that size.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from . import operations as ops
from .errors import BadRequest, Conflict
from .model import VolumeKind, parse_size
from .sealed import SealedBackend
from .serving import is_open

if TYPE_CHECKING:
    from ..exports import Export, ExportCatalog
    from .model import Volume
    from .operations import Operations
    from .state import State


class DiskSizing:
    if TYPE_CHECKING:
        state: State
        catalog: ExportCatalog
        operations: Operations
        _opening: dict
        _idle_timers: dict

        def volume(self, kind: VolumeKind, name: str) -> Volume:
            raise NotImplementedError  # volumes.VolumeOperations'

        def show_disk(self, name: str) -> dict:
            raise NotImplementedError  # volumes.VolumeOperations'

        def _cancel_idle(self, export: Export) -> None:
            raise NotImplementedError  # serving.DiskServing's

        def _close_idle(self, export: Export) -> None:
            raise NotImplementedError  # serving.DiskServing's

    def resize_disk(self, name: str, size) -> asyncio.Task:
        v = self.volume(VolumeKind.DISK, name)
        new = parse_size(size)
        if new < v.size:
            raise BadRequest(f"disk {name!r} is {v.size} bytes; shrinking it to {new} would lose "
                             "the data past the new end: a disk only grows")
        self._check_unattached(name)

        async def run() -> dict:
            self._grow(name, new)  # no await: see the module's docstring
            return self.show_disk(name)

        return self.operations.start(f"resize of disk {name!r}", run, exclusive=[ops.disk(name)])

    def _check_unattached(self, name: str) -> None:
        export = self.catalog.get(name)
        if export is None:
            return
        if export.clients or export in self._opening:
            raise Conflict(f"disk {name!r} is attached ({export.clients} connection(s)): a disk "
                           "grows while no client is attached; detach it, resize, attach again")

    def _grow(self, name: str, new: int) -> None:
        v = self.volume(VolumeKind.DISK, name)  # again: the claim was taken after validation
        if new == v.size:
            return
        self._check_unattached(name)
        export = self.catalog.get(name)
        if export is not None and is_open(export):
            if export not in self._idle_timers:
                # Open with no client counted and no idle timer: a client's open has just
                # finished and its attach is about to count it. Closing now would hand
                # that client a sealed disk.
                raise Conflict(f"disk {name!r} is being attached: a disk grows while no "
                               "client is attached; detach it, resize, attach again")
            self._cancel_idle(export)
            self._close_idle(export)  # sealed now; the old layer drains and flushes behind
        try:
            os.truncate(v.path, new)  # a sparse file: metadata only, holes read as zeros
        except OSError as e:
            from .volumes import _storage_error
            mapped = _storage_error(e, f"resize of disk {name!r}")
            if mapped is e:  # e.g. a failed disk whose file is missing
                raise Conflict(f"disk {name!r}: its file cannot be grown ({e.strerror})") from None
            raise mapped from None
        v.size = new
        self.state.put_volume(v)
        if export is not None and not is_open(export):
            export.backend = SealedBackend(new)  # what the next handshake announces

    def disk_usage(self, name: str) -> dict:
        """What the disk's file holds on the platform's storage: allocated bytes (every
        written sector; a trimmed or never-written one is a hole) against its size."""
        v = self.volume(VolumeKind.DISK, name)
        try:
            st = os.stat(v.path)
        except OSError as e:
            raise Conflict(f"disk {name!r}: its file cannot be read ({e.strerror})") from None
        allocated = st.st_blocks * 512  # st_blocks counts 512-byte units (stat(2))
        return {"disk": name, "size": v.size, "allocated": allocated,
                "allocatedPercent": round(100.0 * allocated / v.size, 2) if v.size else 0.0}
