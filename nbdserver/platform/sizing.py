"""A disk's size over its life: grow it (`resize_disk`), and how much of it is stored
(`disk_usage`). One of the parts `Platform` is built from (see `service`).

Growing is a truncate of the sparse file, which adds holes, and the encryption layer
reads a hole as zeros: no byte is written and nothing is re-encrypted. Shrinking is
refused: the data past the new end would be lost, and a file system on the disk does
not expect its device to get smaller under it.

A disk grows online, attached or not. NBD tells a client its export's size once, at the
handshake (doc/proto.md, NBD_INFO_EXPORT), and has no message to announce another, so:
the clients attached keep working at the size they negotiated (a request past it is
still refused, EINVAL for a read, ENOSPC for a write, as the spec's error rules ask;
`server.Connection.size`), and every connection made afterwards, a reconnect of the
same host included, is told the new size. The order leaves no window for a client to be
told a size the file does not have: the file is extended first, then the state records
the size, then the export and the I/O workers' copies of it grow in place (the open
encryption layer keeps its key and its in-flight requests), all without an await.

A crash between the truncate and the state's commit leaves a file longer than its
recorded size, which is no failure (`backing.problem`): nothing was written past the
old end (no client ran in between). The resize was never answered; a retry records it.

What else may hold the disk: a snapshot, image or disk being copied from it claims it
(shared), and a resize claims it exclusively, so a resize during a copy is refused with
409 naming the copy (a copy has its size fixed when it starts). A client's attach in
progress (its open is unwrapping the key) is waited for: its handshake already
computed the old size, which it keeps, and the grow then follows an open disk.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from . import backing
from . import operations as ops
from .errors import BadRequest, Conflict
from .model import VolumeKind, parse_size
from .sealed import SealedBackend
from .serving import is_open

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..exports import Export, ExportCatalog
    from .model import Volume
    from .operations import Operations
    from .state import State
    from .storage import VolumeStorage


class DiskSizing:
    """Grows disks and tells their usage. It reads volumes through `find_volume` and
    answers with `show_disk` (both the volumes part's), and asks `opening` whether a
    client's open of an export is in progress (the serving part's)."""

    def __init__(self, state: State, storage: VolumeStorage, catalog: ExportCatalog,
                 operations: Operations, *, find_volume: Callable[[VolumeKind, str], Volume],
                 show_disk: Callable[[str], dict],
                 opening: Callable[[Export], asyncio.Future | None]):
        self.state = state
        self.storage = storage
        self.catalog = catalog
        self.operations = operations
        self.find_volume = find_volume
        self.show_disk = show_disk
        self.opening = opening

    def resize_disk(self, name: str, size) -> asyncio.Task:
        v = self.find_volume(VolumeKind.DISK, name)
        new = parse_size(size)
        if new < v.size:
            raise BadRequest(f"disk {name!r} is {v.size} bytes; shrinking it to {new} would lose "
                             "the data past the new end: a disk only grows")

        async def run() -> dict:
            await self._opens_done(name)
            self._grow(name, new)  # no await: see the module's docstring
            return self.show_disk(name)

        return self.operations.start(f"resize of disk {name!r}", run, exclusive=[ops.disk(name)])

    async def _opens_done(self, name: str) -> None:
        """Until no open of the disk is in progress. Bounded: an open is one unwrap, which
        times out with the key service's call; the operation's deadline covers the rest.
        Its outcome is its client's business, never this operation's."""
        while True:
            export = self.catalog.get(name)
            opening = self.opening(export) if export is not None else None
            if opening is None:
                return
            await asyncio.wait([opening])

    def _grow(self, name: str, new: int) -> None:
        v = self.find_volume(VolumeKind.DISK, name)  # again: the claim was taken after validation
        if new <= v.size:
            return
        old = v.size
        try:
            if backing.is_rbd(v.path):
                # An image grows by its header: one round trip, done here without an await
                # (the module's docstring), like the file's truncate; never shrunk back.
                from ..rbdbackend import resize_image
                resize_image(self.storage.rbd_spec(v.path), new)
            else:
                os.truncate(v.path, new)  # a sparse file: metadata only, holes read as zeros
        except OSError as e:
            from .volumes import _storage_error
            mapped = _storage_error(e, f"resize of disk {name!r}")
            if mapped is e:  # e.g. a failed disk whose file is missing
                raise Conflict(f"disk {name!r}: its file cannot be grown ({e.strerror})") from None
            raise mapped from None
        v.size = new
        try:
            self.state.put_volume(v)
        except BaseException:
            v.size = old
            if not backing.is_rbd(v.path):  # an image keeps the larger size (no client used it)
                os.truncate(v.path, old)  # nothing wrote past the old end: no await since
            raise
        export = self.catalog.get(name)
        if export is None:
            return
        if is_open(export):
            export.grow(new)  # in place, the I/O workers' copies too
        else:
            export.backend = SealedBackend(new)  # what the next handshake announces

    def disk_usage(self, name: str) -> dict:
        """What the disk's file holds on the platform's storage: allocated bytes (every
        written sector; a trimmed or never-written one is a hole) against its size."""
        v = self.find_volume(VolumeKind.DISK, name)
        if backing.is_rbd(v.path):
            raise BadRequest(f"disk {name!r} is on Ceph RBD: `rbd du` tells its usage")
        try:
            st = os.stat(v.path)
        except OSError as e:
            raise Conflict(f"disk {name!r}: its file cannot be read ({e.strerror})") from None
        allocated = st.st_blocks * 512  # st_blocks counts 512-byte units (stat(2))
        return {"disk": name, "size": v.size, "allocated": allocated,
                "allocatedPercent": round(100.0 * allocated / v.size, 2) if v.size else 0.0}
