"""Exports: the named disks a server offers, and their serving state.

An `Export` joins a name to the block backend at the top of its data path. Its state is
explicit: AVAILABLE serves I/O; LOCKED (the disk's key was revoked, or the platform
closed it) fails every request with EIO and refuses new connections with a message.
The disk platform drives these transitions; the server only obeys them.

`ExportCatalog` is what the protocol's handshake asks (`lookup`, `listing`), and what the
server tells when a client selects an export and when it leaves (`attach`, `detach`): an
`opener` (the disk platform) may then open the disk's key, and close it after the last
client left.

An export may also be served by other processes (the I/O workers, nbdserver/iopool.py):
its `source` says how to open the same backend there, and its `copies` (set by whoever
handed connections to them) hear every state change made here: a lock stops them (drain,
wipe the key), an unlock opens them again, a freeze holds their requests too. The
platform drives this process's Export only; the fan-out is the copies' business.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from .backend import BlockBackend
from .iostats import ExportStats
from .protocol.constants import (
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_REP_ERR_UNKNOWN,
    PREFERRED_BLOCK_SIZE,
)
from .protocol.handshake import ExportInfo, ExportRefused


class ExportState(Enum):
    AVAILABLE = "available"
    LOCKED = "locked"


def transmission_flags(backend: BlockBackend, readonly: bool) -> int:
    caps = backend.capabilities
    flags = NBD_FLAG_HAS_FLAGS
    writable = caps.writable and not readonly
    if not writable:
        flags |= NBD_FLAG_READ_ONLY
    if caps.flush and writable:
        flags |= NBD_FLAG_SEND_FLUSH
    if caps.fua and writable:
        flags |= NBD_FLAG_SEND_FUA
    if caps.trim and writable:
        flags |= NBD_FLAG_SEND_TRIM
    if caps.zero and writable:
        flags |= NBD_FLAG_SEND_WRITE_ZEROES
        if caps.fast_zero:
            flags |= NBD_FLAG_SEND_FAST_ZERO
    if caps.cache:
        flags |= NBD_FLAG_SEND_CACHE
    if caps.multi_conn:
        flags |= NBD_FLAG_CAN_MULTI_CONN
    return flags


@dataclass(frozen=True)
class ExportSource:
    """How another process opens the same backend: `spec` is the disk's
    `backend.FileSpec` (file, cache mode, encrypted or not: `crypto.open_disk` opens it),
    and `key` its DEK, the very bytearray the backend's cipher owns (wiped in place when
    it closes), never a copy."""
    spec: Any
    key: bytearray | None = None


class ExportCopies(Protocol):
    """The other processes serving an export (nbdserver/iopool.py's workers)."""

    def opened(self, export: Export) -> None: ...  # a new backend (and key) serves

    def stop(self, export: Export) -> None: ...  # lock, drain and wipe: sent at once

    async def stopped(self, export: Export) -> None: ...  # every stop sent so far is done

    # Their requests held and drained; `token` names this freeze (one export may be
    # frozen by several snapshots at once), for its thaw.
    async def freeze(self, export: Export, token: object) -> None: ...

    def thaw(self, export: Export, token: object) -> None: ...

    def grown(self, export: Export) -> None: ...  # the backend serves more bytes: follow it


@dataclass
class Attachment:
    """One connection in transmission on an export."""
    peer: str
    identity: str | None = None  # the verified TLS client certificate's, if any
    since: float = field(default_factory=time.time)


class Export:
    def __init__(self, name: str, backend: BlockBackend, *, description: str = "",
                 readonly: bool = False):
        if backend.size % MIN_BLOCK_SIZE:
            raise ValueError(f"export size must be a multiple of {MIN_BLOCK_SIZE}")
        self.name = name
        self.description = description
        self.readonly = readonly
        self.backend = backend
        self.state = ExportState.AVAILABLE
        self.lock_reason = ""
        self.flags = transmission_flags(backend, readonly)
        self._inflight = 0
        self.sessions: set = set()  # connections a native session serves (stop_sessions)
        self._idle: asyncio.Event | None = None
        self.attachments: dict[object, Attachment] = {}  # connection -> who, since when
        self._frozen = 0
        self._parked: list = []
        self._source: tuple[BlockBackend, ExportSource] | None = None
        self.generation = 0  # counts the sources shared: a copy holding an older one is stale
        self.copies: ExportCopies | None = None
        self._stats: ExportStats | None = None  # made at first use: see `stats`

    @property
    def stats(self) -> ExportStats:
        """Where the server counts this export's requests (nbdserver/iostats.py). Made at
        first use: its histograms are a few KiB, and a disk nobody uses must cost almost
        nothing (docs/operations.md, capacity planning)."""
        if self._stats is None:
            self._stats = ExportStats()
        return self._stats

    @property
    def stats_if_used(self) -> ExportStats | None:
        """The counts, or None if nothing was ever counted (a scrape makes none)."""
        return self._stats

    # -- state transitions (called on the event loop)
    def lock(self, reason: str) -> None:
        """Stop serving: requests from now on fail with EIO, new clients are refused;
        other processes serving it are told at once."""
        self.state = ExportState.LOCKED
        self.lock_reason = reason
        self.stop_sessions()
        self.stop_copies()

    def replace_backend(self, backend: BlockBackend) -> None:
        """Serve `backend` from now on, unlocked (a sealed one when the disk closes without
        a revocation: no client left, or its lease lost to another server). What still
        serves the old backend stops now, as for a lock: native sessions return after the
        pass they are in, and other processes drop their copies."""
        self.backend = backend
        self.stop_sessions()
        self.stop_copies()

    def unlock(self, backend: BlockBackend | None = None, source: ExportSource | None = None) -> None:
        if backend is not None:
            self.backend = backend
            self.flags = transmission_flags(backend, self.readonly)
            if source is not None:
                self.share(source)
        self.state = ExportState.AVAILABLE
        self.lock_reason = ""
        if backend is not None and self.copies is not None and self.source is not None:
            self.copies.opened(self)

    def grow(self, size: int) -> None:
        """Serve `size` bytes to the clients that attach from now on (the storage below
        holds them already); the other processes grow their copies too. A connection
        keeps the size it negotiated (server.Connection.size): NBD tells a size once, at
        the handshake, and has no message to announce another."""
        if size % MIN_BLOCK_SIZE:
            raise ValueError(f"export size must be a multiple of {MIN_BLOCK_SIZE}")
        self.backend.grow(size)
        if self.copies is not None:
            self.copies.grown(self)

    # -- other processes (docs/architecture.md, "The data path")
    def share(self, source: ExportSource) -> None:
        """Let other processes open the current backend as `source` says."""
        self._source = (self.backend, source)
        self.generation += 1

    @property
    def source(self) -> ExportSource | None:
        """How to open the current backend elsewhere; None once it was replaced (sealed,
        closed) or never shared: then only this process serves the export."""
        if self._source is None or self._source[0] is not self.backend or self.locked:
            return None
        return self._source[1]

    def stop_copies(self) -> None:
        if self.copies is not None:
            self.copies.stop(self)

    async def copies_stopped(self) -> None:
        if self.copies is not None:
            await self.copies.stopped(self)

    @property
    def locked(self) -> bool:
        return self.state is ExportState.LOCKED

    @property
    def clients(self) -> int:
        """Connections in transmission on this export ("attached")."""
        return len(self.attachments)

    # -- in-flight accounting, so a lock can wait for the backend to be idle
    def stop_sessions(self) -> None:
        """Make every thread serving a connection of this export natively
        (server.Connection's session, counted in flight) return to its event loop."""
        for conn in list(self.sessions):
            conn.stop_session()

    def begin(self) -> None:
        self._inflight += 1

    def end(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            # Every waiter is woken, however many there are (a snapshot's freeze, a delete,
            # a revocation): each waits on the same future, made by the first of them.
            idle, self._idle = self._idle, None
            if idle is not None:
                idle.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def drained(self) -> None:
        """Return once no request is running against the backend, at some moment after
        the call. Callers stop new requests first (lock or freeze), so that moment lasts;
        any number of them may wait at once."""
        if self._inflight:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    # -- freezing: hold new requests (they wait, they do not fail) for a consistent copy
    @property
    def is_frozen(self) -> bool:
        return self._frozen > 0

    def park(self, resume) -> None:
        """Called by the server for a request that arrives while frozen."""
        self._parked.append(resume)

    @contextlib.asynccontextmanager
    async def frozen(self):
        self._frozen += 1
        self.stop_sessions()
        copies, token = self.copies, object()
        try:
            await self.drained()
            if copies is not None:
                await copies.freeze(self, token)
            yield
        finally:
            if copies is not None:
                copies.thaw(self, token)
            self._frozen -= 1
            if not self._frozen:
                parked, self._parked = self._parked, []
                for resume in parked:
                    resume()

    def info(self) -> ExportInfo:
        return ExportInfo(self.name, self.backend.size, self.flags, self.description,
                          MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE)


class ExportOpener(Protocol):
    """What the catalog tells when clients come and go (the disk platform's serving)."""

    async def attach(self, export: Export) -> bool: ...  # False refuses the client

    def detached(self, export: Export) -> None: ...


class ExportCatalog:
    def __init__(self, default: str | None = None):
        self._exports: dict[str, Export] = {}
        self.default = default
        # Told when a client selects an export and when the last one leaves:
        # `async attach(export) -> bool` (False refuses the client), `detached(export)`.
        self.opener: ExportOpener | None = None

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"export {export.name!r} exists")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export | None:
        return self._exports.pop(name, None)

    def get(self, name: str) -> Export | None:
        if name == "" and self.default is not None:
            name = self.default
        return self._exports.get(name)

    def __iter__(self):
        return iter(list(self._exports.values()))

    def export(self, name: str) -> Export:
        """The export a client may use, or ExportRefused. A locked export is refused in
        the very words of an unknown one: a lock's reason names keys and vaults, and
        anonymous clients must not learn which disks exist (nbdserver/visibility.py).
        The reason goes to the operator as the refusal's `detail`."""
        export = self.get(name)
        if export is None or export.locked:
            raise ExportRefused(NBD_REP_ERR_UNKNOWN, f"export {name!r} is not available",
                                detail="no such export" if export is None
                                else f"locked: {export.lock_reason}")
        return export

    # -- the server's: a client selected an export (NBD_OPT_GO, NBD_OPT_EXPORT_NAME)
    async def attach(self, name: str, client, *, peer=None, identity: str | None = None
                     ) -> Export | None:
        """Make `name` ready to serve `client` and count it; None if it cannot be used
        now (gone, locked, or its key refused while opening)."""
        export = self.get(name)
        if export is None or export.locked:
            return None
        if self.opener is not None and not await self.opener.attach(export):
            return None
        if self.get(name) is not export or export.locked:  # deleted or locked meanwhile
            return None
        export.attachments[client] = Attachment(_peer_text(peer), identity)
        return export

    def transfer(self, export: Export, client, to) -> None:
        """`client`'s attachment now belongs to `to` (a connection that moved to another
        process): counted once, detached when `to` is."""
        attachment = export.attachments.pop(client, None)
        if attachment is not None:
            export.attachments[to] = attachment

    def detach(self, export: Export, client) -> None:
        if export.attachments.pop(client, None) is not None and self.opener is not None \
                and not export.attachments:
            self.opener.detached(export)

    # -- the protocol's Catalog
    def lookup(self, name: str) -> ExportInfo:
        return self.export(name).info()

    def listing(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self._exports.values()]


def _peer_text(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer is not None else ""
