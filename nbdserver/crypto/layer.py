"""XtsLayer: an encrypting block backend that wraps any other block backend.

Like nbdkit's luks filter, it has the interface of the layer beneath it
(`nbdserver.backend.BlockBackend`), so the server never knows a disk is encrypted, and
this layer never knows about NBD. The on-disk format is in `cipher.py` and
docs/format.md: AES-256-XTS per 4096-byte sector, ciphertext of sector `s` at
`s * 4096`, holes read as zeros.

Requests need not be sector-aligned (clients may send 512-byte I/O): a request is split
into an unaligned head, an aligned body and an unaligned tail. Reads of the ends go
through a per-thread scratch sector; writes of the ends are read-modify-write, ordered
by `SectorLocks` against every other write to the same sectors.

Copies are avoided:
- a large read is decrypted straight out of the lower layer's file mapping into the
  caller's buffer (`BlockBackend.mapping()`, under a SIGBUS guard); a small one lands in
  the caller's buffer and is decrypted in place; a page-cache read of whole sectors on
  the server's event loop (nowait) is read and decrypted in one engine call
  (`read_decrypt`), over a file whose fd the layer learnt when it opened;
- a large aligned write whose data is still arriving (an NBD WRITE payload) is staged
  (`stage_write` -> `EncryptingStage`): each piece is encrypted straight out of the
  receive buffer as it arrives, and the ciphertext written in one lower pwrite;
- an aligned write whose buffer the caller hands over (`owned=True`, as the server does
  with a WRITE payload) is encrypted in place, and over a plain file encrypted and written
  in one native call (`BlockBackend.native_write`); one inside a single lock stripe (64
  KiB; the server's 4 KiB random writes, run on its event loop) takes a short path: the
  stripe lock and that one call, with the file's fd learnt when the layer opened;
- any other write is encrypted into a per-thread scratch buffer (reused, at most CHUNK)
  and written from there with one lower pwrite per CHUNK.

Cold reads (`submit_read`): a whole-sector read over a lower layer that reads natively
(`native_read`: a plain file) goes to the server's native read queue with this layer's
decryption as its transform (both layers' for a double disk), so preadv and decryption
both run without the GIL.

Over a file opened with O_DIRECT (cache=none: the lower layer's `io_align`), every lower
write is whole aligned sectors already; what changes is where the ciphertext lives. It
is encrypted into an aligned scratch buffer (or a staged write's aligned buffer) instead
of in place, and read into one and decrypted out of it into the caller's buffer: the
same single pass over the data, and the file never sees an unaligned buffer. There is
no mapping to read from (it would fill the page cache that cache=none avoids).

nowait (see backend.py): passed down unchanged, and sector locks held by another write
are not waited for (BlockingIOError: the server's event loop must not wait for a
worker's RMW or a whole-disk trim). Everything this layer does before the lower write
(RMW reads, encryption into scratch) is reversible, and a write goes down as a single
lower call, so a BlockingIOError from below leaves nothing half done. A write longer
than CHUNK would need several lower calls, so with nowait it is refused up front.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from ..backend import (
    BlockBackend,
    Extent,
    FileSpec,
    FilterBackend,
    WriteStage,
    aligned,
    aligned_buffer,
    defined_together,
)
from .cipher import SECTOR_SIZE, XtsSectorCipher
from .double import DOUBLE_KEY_SIZE, DoubleXtsCipher
from .sector_locks import SECTORS_PER_STRIPE, STRIPES, Held, SectorLocks

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from typing_extensions import CapsuleType

S = SECTOR_SIZE
# Largest write sent down in one call, and the per-thread scratch cap: above it a request
# is encrypted and written in CHUNK pieces, so a 32 MiB NBD write needs no 32 MiB buffer.
CHUNK = 1 << 20
# Reads at least this large (and not nowait) decrypt straight out of the lower layer's
# mapping; smaller ones gain little and keep the plain pread path.
MAP_MIN = 64 * 1024
# Owned aligned writes up to this size (one lock stripe) may take pwrite's short path.
SMALL_WRITE = SECTORS_PER_STRIPE * S
BUSY = "another write holds these sectors: use a worker"


class ReadQueue(Protocol):
    """What `submit_read` asks of the server's native read queue (`nbdserver._readq.
    ReadQueue` or `nbdserver._uring.RingQueue`, one API): this layer may not import the
    server's modules, only be handed one."""

    def submit(self, token: object, buf: WriteableBuffer, fd: int, offset: int,
               transform: CapsuleType | None = None, first: int = 0, *, align: int = 0) -> None: ...


class XtsLayer(FilterBackend):
    """`XtsLayer(lower, key)`: AES-256-XTS over `lower`, keyed by the 64-byte DEK `key`.

    Takes ownership of both once constructed: `close()` wipes `key` and closes `lower`.
    If construction raises (bad key: TypeError/InvalidKey; size not whole sectors:
    OSError EINVAL), the caller still owns them.

    A `FilterBackend`: its capabilities are the lower layer's (trim and zero map to
    whole sectors below plus RMW at the ends; flush, FUA and cache pass straight
    through), and as it changes both reads and writes, the side channels it does not
    define (`native_write`, `native_read`, `mapping`) decline.
    """

    def __init__(self, lower: BlockBackend, key: bytearray) -> None:
        if lower.size % S:
            # A partial last sector has no XTS data unit (and dm-crypt would refuse it).
            # OSError like every backend failure (backend.py), so callers' handlers apply.
            raise OSError(errno.EINVAL, f"the disk size {lower.size} is not a multiple of {S} bytes")
        # Asked before the cipher exists: nothing after it may fail (the key is mlocked).
        self._small_write_fd = self._fixed_native_fd(lower)
        self._nowait_read_fd = self._fixed_read_fd(lower)
        # Two DEKs in one buffer (double.py) key two layers of XTS per sector.
        self._cipher = (DoubleXtsCipher if len(key) == DOUBLE_KEY_SIZE else XtsSectorCipher)(key, S)
        self._encrypt = self._cipher.encrypt
        self._decrypt = self._cipher.decrypt
        self._encrypt_write = self._cipher.encrypt_write
        self._read_decrypt = self._cipher.read_decrypt
        super().__init__(lower)
        self._size = lower.size
        self._native_write = lower.native_write
        self._align = lower.io_align  # O_DIRECT below: hand it aligned buffers only
        # Made on the first submit_read: nothing here may fail.
        self._read_transform: CapsuleType | None = None
        # The file below, if any: its byte-range locks order RMW across processes.
        fileno = getattr(lower, "fileno", None)
        self._locks = SectorLocks(STRIPES, SECTORS_PER_STRIPE, file_fd=fileno() if fileno else None)
        self._local = threading.local()
        self._closed = False
        # Made by page_cache_writes; two layers' ciphers have none (then False).
        self._write_transform: CapsuleType | None | bool = None

    # --- BlockBackend -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size  # the lower layer's (changed by grow only): read for every request

    @property
    def io_align(self) -> int:
        return self._align

    def pread(self, buf: memoryview, offset: int, *, nowait: bool = False) -> None:
        fd = self._nowait_read_fd
        if nowait and fd is not None and not self._closed:
            # The hot path of small reads (the event loop's page-cache hits): the read
            # and the decryption in one engine call (see _fixed_read_fd).
            n = len(buf)
            if n and not (offset | n) % S:
                try:
                    self._read_decrypt(buf, fd, offset, offset // S, os.RWF_NOWAIT)
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                    self._nowait_read_fd = None  # this file system cannot say: ask below
                    raise BlockingIOError(errno.EAGAIN, "nowait unsupported") from None
                return
        self._check_open()
        if nowait and self._align:  # O_DIRECT below: every read waits for the device
            raise BlockingIOError(errno.EAGAIN, "O_DIRECT: no page cache to hit")
        buf = memoryview(buf).cast("B")
        n = len(buf)
        if n == 0:
            return
        head = offset % S
        if head == 0 and n % S == 0:  # the common case: straight into the caller's buffer
            self._read_sectors(buf, offset, nowait)
            return
        pos = 0
        if head:  # unaligned head: its sector through scratch
            pos = min(S - head, n)
            sector = self._scratch(S)
            self._read_sectors(sector, offset - head, nowait)
            buf[:pos] = sector[head:head + pos]
        body = (n - pos) // S * S
        if body:
            self._read_sectors(buf[pos:pos + body], offset + pos, nowait)
            pos += body
        if pos < n:  # unaligned tail
            sector = self._scratch(S)
            self._read_sectors(sector, offset + pos, nowait)
            buf[pos:] = sector[:n - pos]

    def page_cache_reads(self) -> tuple[int, object | None, int] | None:
        # pread's hot path above, as one native call per received chunk.
        fd = self._nowait_read_fd
        if fd is None or self._closed:
            return None
        transform = self._read_transform
        if transform is None:
            transform = self._read_transform = self._cipher.read_transform()
        return fd, transform, S

    def page_cache_writes(self) -> tuple[int, object | None, int, list[Any] | None, int] | None:
        # pwrite's short path below (flags 0, one stripe lock), as one native call per
        # received chunk.
        fd = self._small_write_fd
        if fd is None or self._closed or self.starts_requests:
            return None
        transform = self._write_transform
        if transform is None:
            transform = self._write_transform = self._cipher.write_transform() or False
        if transform is False:
            return None
        locks, per = self._locks.stripes()
        return fd, transform, S, locks, per

    def pwrite(self, data: memoryview, offset: int, *, fua: bool = False, nowait: bool = False,
               owned: bool = False) -> None:
        if self._closed:
            self._check_open()
        if nowait and self._align:  # refused below anyway: spare the locks and the unwinding
            raise BlockingIOError(errno.EAGAIN, "O_DIRECT write: use a worker")
        data = memoryview(data).cast("B")
        n = len(data)
        fd = self._small_write_fd
        if fd is not None and owned and not fua and n <= SMALL_WRITE and not (offset | n) % S and n:
            # The hot path of small random writes (run inline on the server's event
            # loop, where every call adds to each request): one stripe lock, and
            # encryption and the write in one engine call. Only over a lower layer whose
            # small writes all go to one fd with flags 0 (see _fixed_native_fd).
            first = offset // S
            stripe_lock = self._locks.single(first, first + n // S)
            if stripe_lock is not None:  # within one stripe
                if not stripe_lock.acquire(not nowait):
                    raise BlockingIOError(errno.EAGAIN, BUSY)
                try:
                    self._encrypt_write(data, fd, offset, first, 0)
                finally:
                    stripe_lock.release()
                return
        if n == 0:
            return
        first = offset // S
        if offset % S == 0 and n % S == 0 and (n <= CHUNK or (owned and not nowait)):
            # The common case, no RMW: one encryption, one lower write. A buffer the
            # caller handed over is encrypted in place (any size: no scratch needed).
            end = first + n // S
            lock = self._locks.single(first, end)
            if lock is not None:  # most writes: one stripe, one lock, no list
                if not lock.acquire(not nowait):
                    raise BlockingIOError(errno.EAGAIN, BUSY)
                try:
                    self._write_whole(data, offset, first, fua, nowait, owned)
                finally:
                    lock.release()
                return
            held = self._acquire(first, end, nowait)
            try:
                self._write_whole(data, offset, first, fua, nowait, owned)
            finally:
                self._locks.release(held)
            return
        end = -(-(offset + n) // S)
        if nowait and (end - first) * S > CHUNK:
            raise BlockingIOError(errno.EAGAIN, "write spans several chunks: use a worker")
        held = self._acquire(first, end, nowait)
        try:
            for start in range(first * S, end * S, CHUNK):
                stop = min(start + CHUNK, end * S)
                self._write_chunk(data, offset, start, stop, fua, nowait)
        finally:
            self._locks.release(held)

    def submit_read(self, queue: ReadQueue, buf: bytearray | memoryview, offset: int,
                    token: object) -> bool:
        # Whole sectors only: an unaligned end needs the scratch sector of pread.
        self._check_open()
        n = len(buf)
        if not n or (offset | n) % S:
            return False
        fd = self.lower.native_read(n)
        if fd is None:
            return False
        transform = self._read_transform
        if transform is None:
            transform = self._read_transform = self._cipher.read_transform()
        # Decrypted on the queue's thread, all-zero ciphertext sectors read as holes
        # (zeros), exactly as _read_sectors does.
        queue.submit(token, buf, fd, offset, transform, offset // S, align=self._align)
        return True

    def submit_write(self, queue: object, data: bytearray, offset: int, token: object, *,
                     fua: bool = False, done: Callable[[], None] | None = None) -> bool:
        # Over O_DIRECT only (cache=none: a write a worker would otherwise carry), whole
        # sectors of one lock stripe, as pwrite's short path. `data` is the caller's
        # own (owned=True): encrypted in place and handed down, decrypted back if the
        # lower layer declines (the caller then writes the plaintext through pwrite).
        # The stripe's lock is taken without waiting (the caller is the event loop)
        # and held until the queue reports the write, so no read-modify-write of these
        # sectors runs meanwhile.
        self._check_open()
        n = len(data)
        if not self._align or not n or (offset | n) % S or n > SMALL_WRITE:
            return False
        first = offset // S
        lock = self._locks.single(first, first + n // S)
        if lock is None or not lock.acquire(False):
            return False
        release = lock.release if done is None else partial(_release_then, lock, done)
        try:
            self._encrypt(data, data, first)
            try:
                taken = self.lower.submit_write(queue, data, offset, token, fua=fua, done=release)
            except BaseException:
                self._decrypt(data, data, first)
                raise
        except BaseException:
            lock.release()
            raise
        if not taken:
            self._decrypt(data, data, first)
            lock.release()
        return taken

    def flush(self) -> None:
        self._check_open()
        self.lower.flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_open()
        self._clear(offset, length, lambda o, n: self.lower.trim(o, n, fua=fua), fua)

    def zero(self, offset: int, length: int, *, may_trim: bool = True, fua: bool = False,
             fast: bool = False) -> None:
        self._check_open()
        self._clear(offset, length,
                    lambda o, n: self.lower.zero(o, n, may_trim=may_trim, fua=fua, fast=fast),
                    fua)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_open()
        start = offset - offset % S
        stop = -(-(offset + length) // S) * S
        extents = sector_extents(self.lower.block_status(start, stop - start), start)
        return clip_extents(extents, offset - start, length)

    def cache(self, offset: int, length: int) -> None:
        self._check_open()
        start = offset - offset % S
        self.lower.cache(start, -(-(offset + length) // S) * S - start)

    def stage_write(self, offset: int, length: int) -> EncryptingStage | None:
        # Whole sectors only: a write with unaligned ends needs its RMW, after the locks.
        if self._closed or offset % S or length % S or length <= 0 or offset + length > self.size:
            return None
        if not self.lower.capabilities.writable:  # refused anyway: encrypt nothing
            return None
        return EncryptingStage(self, offset, length)

    def grow(self, size: int) -> None:
        # The new sectors are holes below, which read as zeros (all-zero ciphertext is a
        # hole here): nothing to encrypt. Whole sectors only, as at open.
        self._check_open()
        if size % S:
            raise OSError(errno.EINVAL, f"the disk size {size} is not a multiple of {S} bytes")
        self.lower.grow(size)
        self._size = size

    # --- requests a lower layer runs itself (librbd aio: nbdserver/rbdbackend.py) ------

    @property
    def starts_requests(self) -> bool:
        """The lower layer starts requests and completes them on the loop (`aio_*`)."""
        return hasattr(self.lower, "aio_pread")

    def aio_pread(self, buf: bytearray, offset: int,
                  loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Whole sectors: the lower layer's read, then the decryption on the loop as it
        completes (a few microseconds a sector). BlockingIOError when it cannot be done
        so (unaligned, or not yet: the caller then uses a worker). The server counts the
        request in flight until the future is done, so the key outlives it."""
        view = memoryview(buf).cast("B")
        if not self.starts_requests or (offset | len(view)) % S or not len(view):
            raise BlockingIOError(errno.EAGAIN, "not a whole-sector read for aio")
        self._check_open()
        inner: asyncio.Future[None] = self.lower.aio_pread(view, offset, loop)  # type: ignore[attr-defined]
        out: asyncio.Future[None] = loop.create_future()

        def decrypted(f: asyncio.Future[None]) -> None:
            if out.done():
                return
            exc = f.exception()
            if exc is None:
                try:
                    self._decrypt(view, view, offset // S, holes=True)
                except Exception as e:  # noqa: BLE001 (the request's error, not the loop's)
                    exc = e
            if exc is None:
                out.set_result(None)
            else:
                out.set_exception(exc)
        inner.add_done_callback(decrypted)
        return out

    def aio_pwrite(self, data: bytearray, offset: int,
                   loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Whole sectors of a buffer handed over: encrypted in place on the loop, written
        by the lower layer, the sectors' stripe lock held until it completes (a worker's
        read-modify-write of them waits). BlockingIOError as for aio_pread, and when the
        stripe is busy or the write spans two."""
        view = memoryview(data).cast("B")
        n = len(view)
        if not self.starts_requests or (offset | n) % S or not n:
            raise BlockingIOError(errno.EAGAIN, "not a whole-sector write for aio")
        self._check_open()
        if not self.capabilities.writable:
            raise OSError(errno.EPERM, "read-only")
        first = offset // S
        lock = self._locks.single(first, first + n // S)
        if lock is None or not lock.acquire(False):
            raise BlockingIOError(errno.EAGAIN, BUSY)
        try:
            self._encrypt(view, view, first)
            try:
                inner: asyncio.Future[None] = self.lower.aio_pwrite(  # type: ignore[attr-defined]
                    view, offset, loop)
            except BaseException:
                self._decrypt(view, view, first)  # refused before writing: plaintext back
                raise
        except BaseException:
            lock.release()
            raise
        inner.add_done_callback(lambda f: lock.release())
        return inner

    def close(self) -> None:
        """Wipe the key, free the OpenSSL contexts and close the lower layer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cipher.close()
        self.lower.close()

    # --- internals --------------------------------------------------------------------

    @staticmethod
    def _fixed_native_fd(lower: BlockBackend) -> int | None:
        """For pwrite's short path, asked once instead of per write: the fd that every
        non-FUA write of 4 KiB to SMALL_WRITE goes to with plain pwritev2 (flags 0),
        with or without nowait. `native_write`'s answer is fixed for a given length, fua
        and nowait (its contract), so the two ends of the range stand for all of it.
        None when the lower layer refuses any of them or answers otherwise: then every
        write takes the general path, which asks per write and passes its flags on."""
        answers: list[tuple[int, int] | None] = []
        for length in (S, SMALL_WRITE):
            for nowait in (False, True):
                try:
                    answers.append(lower.native_write(length, nowait=nowait))
                except OSError:  # read-only, or refused with nowait
                    return None
        target = answers[0]
        if target is None or any(a != target for a in answers):
            return None
        fd, flags = target
        return fd if flags == 0 else None

    @staticmethod
    def _fixed_read_fd(lower: BlockBackend) -> int | None:
        """For pread's short path, asked once: the fd that `pread(nowait=True)` of whole
        sectors reads with preadv2(RWF_NOWAIT). `native_read` promises that of the
        blocking read; the nowait read is the same call with that one flag only where
        the class that defines `native_read` also defines `pread` (a subclass that
        changes `pread` alone, say to fake cache misses, is not vouched for), and not
        under O_DIRECT, where every read waits for the device."""
        if lower.io_align or not defined_together(type(lower), "pread", "native_read"):
            return None
        return lower.native_read(S)

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "the encrypted disk is closed")

    def _scratch(self, n: int) -> memoryview:
        """This thread's reusable buffer, at least n (<= CHUNK) bytes long; aligned for
        O_DIRECT, so what is encrypted into it can go down as it is."""
        view: memoryview | None = getattr(self._local, "view", None)
        if view is None or len(view) < n:
            view = aligned_buffer(max(n, 64 * 1024))
            self._local.view = view
        return view[:n]

    def _read_scratch(self, n: int) -> memoryview:
        """Another one for O_DIRECT reads into an unaligned buffer: a read may fill the
        sector that _scratch holds (RMW), so it cannot use that one."""
        view: memoryview | None = getattr(self._local, "read_view", None)
        if view is None or len(view) < n:
            view = aligned_buffer(max(n, 64 * 1024))
            self._local.read_view = view
        return view[:n]

    def _read_sectors(self, buf: memoryview, offset: int, nowait: bool) -> None:
        """Read and decrypt whole sectors at the aligned `offset` into `buf`: straight
        out of the lower layer's mapping when it has one (one pass over the data instead
        of a pread copy and then an in-place decryption), else with pread. Not with
        nowait: touching the mapping may wait for the disk."""
        n = len(buf)
        if not nowait and n >= MAP_MIN:
            view = self.lower.mapping()
            if view is not None and offset + n <= len(view):
                self._cipher.decrypt_mapped(view[offset:offset + n], buf, offset // S)
                return
        if self._align and not nowait and n <= CHUNK and not aligned(buf, offset, self._align):
            # O_DIRECT into an unaligned buffer (a request's): read into aligned scratch
            # and decrypt out of it, instead of a bounce copy below and decryption here.
            src = self._read_scratch(n)
            self.lower.pread(src, offset)
            self._cipher.decrypt(src, buf, offset // S, holes=True)
            return
        self.lower.pread(buf, offset, nowait=nowait)
        self._cipher.decrypt(buf, buf, offset // S, holes=True)

    def _acquire(self, first: int, end: int, nowait: bool) -> Held:
        """The locks of sectors [first, end); with nowait, BlockingIOError instead of
        waiting for another write of theirs (a worker's RMW, a whole-disk trim): the
        server's event loop must not wait on a lock, and nothing is touched yet."""
        held = self._locks.acquire(first, end, blocking=not nowait)
        if held is None:
            raise BlockingIOError(errno.EAGAIN, BUSY)
        return held

    def _lock_stage(self, stage: EncryptingStage, nowait: bool) -> Held:
        """A whole stage, ready to go down: the locks of its sectors (see `_acquire`)."""
        if self._closed or stage.failed:
            raise OSError(errno.EIO, "the encrypted disk was closed while the write arrived")
        if stage.received != stage.length:
            raise ValueError(f"commit of {stage.received} of {stage.length} bytes")
        first = stage.offset // S
        return self._acquire(first, first + stage.length // S, nowait)

    def _commit(self, stage: EncryptingStage, fua: bool, nowait: bool) -> None:
        """EncryptingStage.commit: the ciphertext goes down as one lower write, under
        the locks of its sectors (ordered against RMW of the same sectors)."""
        held = self._lock_stage(stage, nowait)
        try:
            self.lower.pwrite(stage.view, stage.offset, fua=fua, nowait=nowait)
        finally:
            self._locks.release(held)

    def _aio_commit(self, stage: EncryptingStage,
                    loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """EncryptingStage.aio_commit: `_commit` by the lower layer's aio (aio_pwrite),
        the sectors' locks taken without waiting and held until the write lands."""
        if not self.starts_requests:
            raise BlockingIOError(errno.EAGAIN, "the lower layer starts no requests")
        held = self._lock_stage(stage, True)
        try:
            inner: asyncio.Future[None] = self.lower.aio_pwrite(  # type: ignore[attr-defined]
                stage.view, stage.offset, loop)
        except BaseException:
            self._locks.release(held)
            raise
        inner.add_done_callback(lambda f: self._locks.release(held))
        return inner

    def _write_whole(self, data: memoryview, offset: int, first: int, fua: bool, nowait: bool,
                     owned: bool) -> None:
        """Whole sectors, locks held: encrypt (in place if `owned`) and write down; for
        a lower layer that is a plain file (`native_write`), both in one engine call."""
        if owned:
            # Refusals (nowait, read-only) come from here, before the buffer is touched.
            target = self._native_write(len(data), fua=fua, nowait=nowait)
            if target is not None:
                self._encrypt_write(data, target[0], offset, first, target[1])
                return
        if owned and not (self._align and len(data) <= CHUNK):
            out = data
        else:  # O_DIRECT below takes aligned scratch as it is, where data needs a copy
            out = self._scratch(len(data))
        self._encrypt(data, out, first)
        try:
            self.lower.pwrite(out, offset, fua=fua, nowait=nowait)
        except BlockingIOError:
            if out is data:  # refused before writing: hand the plaintext back for the retry
                self._decrypt(data, data, first)
            raise

    def _write_chunk(self, data: memoryview, offset: int, start: int, stop: int, fua: bool,
                     nowait: bool) -> None:
        """Encrypt the part of the write that falls in the aligned range [start, stop)
        into scratch, merging partial sectors with their old contents, and write it."""
        out = self._scratch(stop - start)
        lo = max(offset, start) - start             # data's extent within the chunk
        hi = min(offset + len(data), stop) - start
        body_lo = -(-lo // S) * S                    # whole sectors covered by data
        body_hi = hi // S * S
        if body_lo < body_hi:
            src = data[start + body_lo - offset:start + body_hi - offset]
            self._cipher.encrypt(src, out[body_lo:body_hi], (start + body_lo) // S)
        partial = {p for p in (lo // S * S if lo % S else None,
                               body_hi if hi % S else None) if p is not None}
        for p in sorted(partial):
            a, b = max(lo, p), min(hi, p + S)
            self._merge_sector(out[p:p + S], start + p, a - p,
                               data[start + a - offset:start + b - offset], nowait)
        self.lower.pwrite(out, start, fua=fua, nowait=nowait)

    def _merge_sector(self, sector: memoryview, pos: int, at: int, piece: memoryview | bytes,
                      nowait: bool) -> None:
        """RMW in scratch: the sector at `pos` with `piece` laid over it at byte `at`,
        encrypted. Caller holds the sector's lock."""
        self._read_sectors(sector, pos, nowait)
        sector[at:at + len(piece)] = piece
        self._cipher.encrypt(sector, sector, pos // S)

    def _clear(self, offset: int, length: int, whole: Callable[[int, int], None], fua: bool) -> None:
        """Trim/zero: whole sectors by `whole(off, len)` below (punching holes), the
        partial sectors at the ends by read-modify-write of zeros."""
        if length <= 0:
            return
        end = offset + length
        body_lo = -(-offset // S) * S
        body_hi = end // S * S
        held = self._locks.acquire(offset // S, -(-end // S))
        try:
            if body_lo < body_hi:  # first, so a refused fast zero leaves nothing done
                whole(body_lo, body_hi - body_lo)
            ends = {p for p in (offset - offset % S if offset % S else None,
                                body_hi if end % S else None) if p is not None}
            for p in sorted(ends):
                a, b = max(offset, p), min(end, p + S)
                if a >= b:
                    continue
                sector = self._scratch(S)
                self._merge_sector(sector, p, a - p, bytes(b - a), False)
                self.lower.pwrite(sector, p, fua=fua)
        finally:
            self._locks.release(held)


def _release_then(lock: threading.Lock, done: Callable[[], None]) -> None:
    lock.release()
    done()


def sector_extents(extents: list[Extent], start: int) -> list[Extent]:
    """Round the lower layer's extents (from the aligned `start`) to whole sectors.

    A sector is a hole (or reads as zero) only if all of it is, since a partly allocated
    sector holds real ciphertext; data is always a safe answer. A trailing partial sector
    the lower layer did not describe is left out (the reply may be short), unless nothing
    else remains, in which case that sector is reported as data.
    """
    out: list[tuple[int, bool, bool]] = []  # (length, hole, zero), merged as they come

    def emit(length: int, hole: bool, zero: bool) -> None:
        if out and out[-1][1] == hole and out[-1][2] == zero:
            out[-1] = (out[-1][0] + length, hole, zero)
        else:
            out.append((length, hole, zero))

    pos = start
    # (sector start, hole, zero) of a sector described only in part so far
    pending: tuple[int, bool, bool] | None = None
    for e in extents:
        a, b = pos, pos + e.length
        pos = b
        if pending is not None:
            p, hole, zero = pending
            hole, zero = hole and e.hole, zero and e.zero
            if b < p + S:
                pending = (p, hole, zero)
                continue
            emit(S, hole, zero)
            pending = None
            a = p + S
        whole_end = b // S * S
        if whole_end > a:
            emit(whole_end - a, e.hole, e.zero)
            a = whole_end
        if b > a:
            pending = (a, e.hole, e.zero)
    if not out:
        emit(S, False, False)
    return [Extent(length, hole=hole, zero=zero) for length, hole, zero in out]


def clip_extents(extents: list[Extent], skip: int, length: int) -> list[Extent]:
    """Drop the first `skip` bytes and everything past `length` bytes after them."""
    out: list[Extent] = []
    for e in extents:
        n = e.length
        if skip:
            cut = min(skip, n)
            n -= cut
            skip -= cut
        n = min(n, length)
        if n > 0:
            out.append(Extent(n, hole=e.hole, zero=e.zero))
            length -= n
        if length == 0:
            break
    return out


class EncryptingStage(WriteStage):
    """A large write encrypted as its data arrives (`XtsLayer.stage_write`).

    Each whole sector of a piece is encrypted straight out of the receive buffer into
    `buffer`: one pass over the data, where copying the payload and then encrypting it
    in place would be two. A sector split between two pieces is gathered as plaintext,
    then encrypted in place once complete. The data can also be received straight into
    `buffer` (`space`, `took`): each sector is then encrypted in place as soon as all of
    it is in, and the receive buffer's copy is saved too. Either way no byte of
    `buffer` is written before all of it is ciphertext. `commit` writes it as one lower
    write; a stage whose layer was closed meanwhile (the key revoked) fails with EIO.
    """

    def __init__(self, layer: XtsLayer, offset: int, length: int) -> None:
        super().__init__(layer, offset, length)
        self._layer = layer  # `backend`, as the layer it is
        # Aligned over O_DIRECT, which then writes it as it is.
        self.buffer = aligned_buffer(length) if layer._align else bytearray(length)
        self.failed = False  # the layer was closed before all of it was encrypted
        self.view = memoryview(self.buffer)  # what commit writes: all of buffer
        self._encrypt = layer._encrypt
        self._first = offset // S

    def take(self, data: memoryview) -> None:
        at = self.received
        n = len(data)
        if at + n > self.length:
            raise ValueError(f"{at + n} bytes for a write of {self.length}")
        self.received = at + n
        if self.failed:
            return
        view = self.view
        if at % S:  # complete the sector an earlier piece began
            k = min(n, S - at % S)
            view[at:at + k] = data[:k]
            data = data[k:]
            at += k
            if at % S == 0:
                sector = view[at - S:at]
                self._seal(sector, sector, at // S - 1)
        whole = len(data) // S * S
        if whole:
            self._seal(data[:whole], view[at:at + whole], at // S)
        if whole < len(data):  # the start of a sector the next piece completes
            view[at + whole:at + len(data)] = data[whole:]

    def space(self) -> memoryview | None:
        return self.view[self.received:]

    def took(self, n: int) -> None:
        at = self.received
        if not 0 < n <= self.length - at:
            raise ValueError(f"{n} bytes received for {self.length - at} still to come")
        self.received = at + n
        if self.failed:
            return
        # From the sector `at` fell in (take() leaves a split sector's start as
        # plaintext) to the last sector now whole.
        start, stop = at - at % S, self.received - self.received % S
        if stop > start:
            sectors = self.view[start:stop]
            self._seal(sectors, sectors, start // S)

    def _seal(self, src: memoryview, dst: memoryview, sector: int) -> None:
        """Encrypt whole sectors into `dst`, `sector` the first's index in this write."""
        if self.failed:
            return
        try:
            self._encrypt(src, dst, self._first + sector)
        except ValueError:
            if not self._layer._closed:
                raise  # a bug, not a revocation: the connection ends
            # The key was revoked (the layer and its engine closed) while the write
            # arrived: take the rest without encrypting it; commit fails with EIO.
            self.failed = True

    def commit(self, *, fua: bool = False, nowait: bool = False) -> None:
        self._layer._commit(self, fua, nowait)

    def aio_commit(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """`commit` started on the loop over a lower layer that runs requests itself
        (librbd aio); BlockingIOError when it cannot (the caller then commits on a worker)."""
        return self._layer._aio_commit(self, loop)



def open_disk(spec: FileSpec, key: bytearray | None = None) -> BlockBackend:
    """The backend a `FileSpec` describes: the file, and over it, if the spec says the
    disk is encrypted, an XtsLayer keyed by `key` (which it then owns, see XtsLayer).
    The one way the baseline, the platform and an I/O worker process open a disk, so
    they all open it alike. If this raises, the caller still owns `key`."""
    if spec.encrypted != (key is not None):
        raise ValueError("an encrypted disk needs its key, and only an encrypted one")
    lower: BlockBackend = spec.open()
    if key is None:
        return lower
    try:
        return XtsLayer(lower, key)
    except BaseException:
        lower.close()
        raise
