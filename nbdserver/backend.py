"""Block backends: the storage beneath an export.

Every layer of the data path offers the same small interface (`BlockBackend`), in the
manner of nbdkit's plugins and filters: the NBD server talks to whatever is at the top,
the encryption layer (`nbdserver.crypto.XtsLayer`) wraps any backend and is itself one,
and `FileBackend` at the bottom keeps the bytes in a sparse file.

Conventions every implementation keeps:
- Ranges are `(offset, length)` in bytes. The caller (the server) has already checked
  them against `size` and the capabilities; a backend may still refuse with `OSError`.
- Failures are `OSError` with an errno (EIO, ENOSPC, EPERM, EINVAL, ENOTSUP ...). The
  server turns the errno into an NBD error once, at its boundary.
- `nowait=True` asks for the operation only if it can finish without blocking on the
  disk (Linux RWF_NOWAIT: page-cache hits). A backend that cannot tell raises
  `BlockingIOError` and the server repeats the call on a worker thread. This lets the
  event loop answer cached 4 KiB requests inline, with no thread hop, while cold reads
  never stall other connections.
- All methods are thread-safe for non-overlapping ranges; the server may run them from
  several worker threads at once.
- Reads that miss the page cache may go to the server's native read queue instead
  (`submit_read`): native threads that never take the GIL, so cold reads run in
  parallel up to the clients' queue depth. A backend that can describe its read as
  "preadv on this fd" (`native_read`), optionally followed by a native transform of the
  bytes (XtsLayer's decryption), accepts; any other says no and the server uses a worker.
- Cache modes (`FileSpec.cache`, like qemu's `cache=`): `writeback` goes through the
  page cache; `none` opens the file with O_DIRECT, so reads and writes reach the device
  and nothing of the disk is kept in (or has to be evicted from) the page cache. Such a
  file needs its I/O aligned (`io_align`): layers above read and write through aligned
  buffers where they can, `FileBackend` bounces the rest (and does read-modify-write of
  a partial block for byte-granular clients). FLUSH is fdatasync in both modes (O_DIRECT
  does not empty the device's own cache), FUA is RWF_DSYNC in both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from functools import partial
from typing import Any


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the server derives the NBD transmission flags from it."""

    writable: bool = True
    flush: bool = True
    fua: bool = True
    trim: bool = True
    zero: bool = True
    fast_zero: bool = True
    cache: bool = True
    # True only when every client connected to this backend sees every other client's
    # flushed writes (NBD_FLAG_CAN_MULTI_CONN, doc/proto.md): one shared file descriptor
    # in one process gives that.
    multi_conn: bool = True
    extents: bool = True


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one allocation state (NBD `base:allocation`)."""

    length: int
    hole: bool = False  # NBD_STATE_HOLE: no storage allocated
    zero: bool = False  # NBD_STATE_ZERO: reads as zeros


class BlockBackend(ABC):
    """The interface of every layer of the data path."""

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def pread(self, buf: memoryview, offset: int, *, nowait: bool = False) -> None:
        """Fill all of `buf` from `offset`."""

    @abstractmethod
    def pwrite(self, data: memoryview, offset: int, *, fua: bool = False, nowait: bool = False,
               owned: bool = False) -> None:
        """Write all of `data` at `offset`; with `fua`, durable before returning.

        `owned`: the caller hands `data` over and will not read it again, so a layer may
        overwrite it (an encrypting layer then encrypts in place instead of into a copy)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""

    @abstractmethod
    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Hint that the range is unused; it may read back as anything (here: zeros)."""

    @abstractmethod
    def zero(self, offset: int, length: int, *, may_trim: bool = True, fua: bool = False,
             fast: bool = False) -> None:
        """Make the range read as zeros. `may_trim=False` (NBD_CMD_FLAG_NO_HOLE) keeps it
        allocated. With `fast`, raise OSError(ENOTSUP) rather than fall back to writing
        zeros (NBD_CMD_FLAG_FAST_ZERO)."""

    @abstractmethod
    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation of the range, as consecutive extents starting at `offset`. May
        describe less than `length` (at least one byte), never more."""

    def cache(self, offset: int, length: int) -> None:  # noqa: B027 (optional: a no-op by default)
        """Prefetch the range (NBD_CMD_CACHE). Advisory."""

    @property
    def io_align(self) -> int:
        """The alignment (bytes) that the address, offset and length of this backend's
        native I/O need: 0 for none (the page cache takes any), the block size for a file
        opened with O_DIRECT. `native_read`'s fd is then read only through buffers so
        aligned (the read queue bounces the rest), and a layer above does best to hand
        `pwrite`/`pread` aligned buffers (`aligned_buffer`), or pays a copy."""
        return 0

    def native_write(self, length: int, *, fua: bool = False,
                     nowait: bool = False) -> tuple[int, int] | None:
        """`(fd, flags)` when `pwrite(data, offset, fua=, nowait=)` of `length` bytes is
        exactly `pwritev2(fd, data, offset, flags)` until all is written; None when it is
        not. A layer that transforms what it writes (XtsLayer encrypts) can then do both
        in one native call without taking the GIL back in between. Raises what pwrite
        would raise up front (EPERM on a read-only disk, BlockingIOError with nowait).
        The answer for a given length, fua and nowait must not change while the backend
        is open (XtsLayer asks once, at open, for its small writes). A subclass that
        changes pwrite must change this too."""
        return None

    def page_cache_reads(self) -> tuple[int, object | None, int] | None:
        """`(fd, transform, unit)` when `pread(buf, offset, nowait=True)` of whole
        `unit`s is exactly preadv2(fd, RWF_NOWAIT) until all is read (zeros past the end
        of the file), then the read transform capsule (nbdserver/_readq.h; None for
        none) run over it in place, data unit `offset // unit` first; None when it is
        not, or not now. The server then answers page-cache READs natively
        (nbdserver/_cachedio.c), asking again for every chunk it receives, so the
        answer may change at any time. Only the class that defines `pread` can say."""
        return None

    def page_cache_writes(self) -> tuple[int, object | None, int, list[Any] | None, int] | None:
        """`(fd, transform, unit, locks, per)` when `pwrite(data, offset, nowait=True,
        owned=True)` of whole `unit`s inside one stripe of `locks` is exactly: that
        stripe's lock taken without waiting (`locks[(offset // unit // per) %
        len(locks)]`, None while not made; `locks` None for none), the write transform
        capsule (or None) run over the data, then pwritev2(fd, flags 0) until all is
        written. None when it is not, or not now (read-only, closed). The server then
        answers small WRITEs natively (nbdserver/_cachedio.c). Only the class that
        defines `pwrite` can say (FilterBackend declines it under a layer that changes
        `pwrite`)."""
        return None

    def native_read(self, length: int) -> int | None:
        """The fd when `pread(buf, offset)` of `length` bytes is exactly preadv(fd, buf,
        offset) until all is read, zeros past the end of the file; None when it is not.
        The read side of `native_write`: a layer that transforms what it reads (XtsLayer
        decrypts) can then have the read and its transform done together, natively.
        For a backend with `io_align` 0, the class that defines this method and `pread`
        also promises `pread(nowait=True)` to be the same preadv2 with RWF_NOWAIT (and
        EOPNOTSUPP where the file system cannot): XtsLayer reads page-cache hits so."""
        return None

    def submit_read(self, queue, buf, offset: int, token) -> bool:
        """Start `pread(buf, offset)` on `queue` (the server's `_readq.ReadQueue`: native
        threads that never take the GIL) and return True; the queue reports `token` with
        the byte count, or -errno, once the read is done, and keeps `buf` pinned until
        then. False when this backend cannot be read that way: the caller then calls
        pread on a worker. The backend must stay open until the queue reports the read
        (the server counts it in flight until then, so a close waits for it). Raises
        what pread would raise up front."""
        fd = self.native_read(len(buf))
        if fd is None:
            return False
        queue.submit(token, buf, fd, offset, align=self.io_align)
        return True

    def submit_write(self, queue, data, offset: int, token, *, fua: bool = False,
                     done=None) -> bool:
        """Start `pwrite(data, offset, fua=fua, owned=True)` on `queue` (the server's
        io_uring queue, `_uring.RingQueue.submit_write`) and return True; the queue
        reports `token` with the byte count, or -errno, once the write is done. False
        when this backend cannot write that way (the caller then calls pwrite on a
        worker): only a write that would wait for the device, that a worker would
        otherwise carry (O_DIRECT), is worth it. `done()`, if given, runs once the
        write is reported or dropped (a layer above releases its locks there), never
        when this returns False or raises. The backend must stay open until the queue
        reports the write. Raises what pwrite would raise up front."""
        return False

    def stage_write(self, offset: int, length: int) -> WriteStage | None:
        """A `WriteStage` for a write of `length` bytes at `offset` whose data is still
        arriving (a large NBD WRITE payload), or None to take it as one buffer through
        `pwrite`. A layer that transforms what it writes (XtsLayer encrypts) can then
        transform each piece as it arrives, straight from the receive buffer, instead of
        copying it and transforming the copy."""
        return None

    def mapping(self) -> memoryview | None:
        """The whole disk as read-only memory (a file mapping: the page cache itself), or
        None. A layer that transforms what it reads (XtsLayer decrypts) can then read
        from here into its output in one pass instead of copying with pread first.
        Touching it may fault to disk and may raise SIGBUS on an I/O error, so only code
        that guards against that (`_xts.Engine.decrypt_mapped`) reads it, and never on
        the event loop."""
        return None

    def grow(self, size: int) -> None:
        """Serve `size` bytes from now on, the storage below already holding them (the
        platform's online resize extends the file first). Only ever larger; requests in
        flight are not disturbed. A backend that cannot says ENOTSUP."""
        raise enotsup("growing this disk")

    def close(self) -> None:  # noqa: B027 (optional: a no-op by default)
        """Release resources. Idempotent."""


class WriteStage(ABC):
    """One write whose data arrives in pieces, staged by the backend that will write it
    (`BlockBackend.stage_write`): `take()` each piece in order, then `commit()` once all
    `length` bytes are in.

    `take` runs where the data arrives (the event loop): it only copies or transforms
    memory, never blocks, and never raises for a failure of the backend; such a failure
    (the disk closed meanwhile) is reported by `commit`. `take` keeps no reference to
    the piece it is given."""

    def __init__(self, backend: BlockBackend, offset: int, length: int):
        self.backend = backend
        self.offset = offset
        self.length = length
        self.received = 0

    @abstractmethod
    def take(self, data: memoryview) -> None:
        """The next `len(data)` bytes of the write (at most what is still missing)."""

    def space(self) -> memoryview | None:
        """The room the rest of the data can be received into in place (then `took`), or
        None when this stage only takes pieces (the default)."""
        return None

    def took(self, n: int) -> None:
        """`n` more bytes were received at the start of `space()`."""
        raise NotImplementedError(f"{type(self).__name__} takes no data in place")

    @abstractmethod
    def commit(self, *, fua: bool = False, nowait: bool = False) -> None:
        """Write the staged data, as `backend.pwrite` would. A BlockingIOError (nowait)
        leaves the stage as it was, to be committed again on a worker."""


class FilterBackend(BlockBackend):
    """`FilterBackend(lower)`: a layer over another backend that, as it is, changes
    nothing: every method goes to `lower` as it came. A layer (nbdkit calls them
    filters) subclasses it and overrides only what it changes.

    A side channel describes the data path below, so it stays true only while the
    layer leaves that path alone: `native_write`, `submit_write`, `stage_write` and
    `page_cache_writes` promise to do what `pwrite` does (and `zero` and `trim` act on
    what it wrote), `native_read`, `submit_read`, `mapping` and `page_cache_reads` what
    `pread` does (and `block_status` and
    `cache` describe what it reads). Passed through from under a layer that encrypts,
    they would write plaintext to the disk or hand out ciphertext. So a class that
    overrides `pwrite` (or `pread`), and not one of the channels that speak for it,
    gets that channel's safe answer instead of the pass-through, at class creation
    (`_DECLINED`): decline the side channel (the caller then uses the data method),
    one data extent for block status, zeros written through the layer's own `pwrite`,
    an ignored TRIM (the spec allows it) or CACHE.
    Forgetting a channel then costs speed, never data. A layer whose override leaves
    the data as it is (one that counts, say) keeps a channel by naming it in its class:
    `native_write = FilterBackend.native_write`. `size`, `capabilities`, `io_align`,
    `flush`, `grow` and `close` always pass through."""

    def __init__(self, lower: BlockBackend) -> None:
        self.lower = lower

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for data, channels in _SPEAKS_FOR.items():
            for name in channels:
                # The channel as the class has it was defined above (in a base of) the
                # class that last changed the data method: it no longer speaks for it.
                if _owner(cls, name) in _owner(cls, data).__mro__[1:]:
                    setattr(cls, name, _DECLINED[name])

    @property
    def size(self) -> int:
        return self.lower.size

    @property
    def capabilities(self) -> Capabilities:
        return self.lower.capabilities

    @property
    def io_align(self) -> int:
        return self.lower.io_align

    def pread(self, buf: memoryview, offset: int, *, nowait: bool = False) -> None:
        self.lower.pread(buf, offset, nowait=nowait)

    def pwrite(self, data: memoryview, offset: int, *, fua: bool = False, nowait: bool = False,
               owned: bool = False) -> None:
        self.lower.pwrite(data, offset, fua=fua, nowait=nowait, owned=owned)

    def flush(self) -> None:
        self.lower.flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.lower.trim(offset, length, fua=fua)

    def zero(self, offset: int, length: int, *, may_trim: bool = True, fua: bool = False,
             fast: bool = False) -> None:
        self.lower.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.lower.block_status(offset, length)

    def cache(self, offset: int, length: int) -> None:
        self.lower.cache(offset, length)

    def native_write(self, length: int, *, fua: bool = False,
                     nowait: bool = False) -> tuple[int, int] | None:
        return self.lower.native_write(length, fua=fua, nowait=nowait)

    def native_read(self, length: int) -> int | None:
        return self.lower.native_read(length)

    def submit_read(self, queue, buf, offset: int, token) -> bool:
        return self.lower.submit_read(queue, buf, offset, token)

    def submit_write(self, queue, data, offset: int, token, *, fua: bool = False,
                     done=None) -> bool:
        return self.lower.submit_write(queue, data, offset, token, fua=fua, done=done)

    def stage_write(self, offset: int, length: int) -> WriteStage | None:
        return self.lower.stage_write(offset, length)

    def mapping(self) -> memoryview | None:
        return self.lower.mapping()

    def page_cache_reads(self) -> tuple[int, object | None, int] | None:
        return self.lower.page_cache_reads()

    def page_cache_writes(self) -> tuple[int, object | None, int, list[Any] | None, int] | None:
        return self.lower.page_cache_writes()

    def grow(self, size: int) -> None:
        self.lower.grow(size)

    def close(self) -> None:
        self.lower.close()


# Which side channels speak for which data method (FilterBackend's docstring).
_SPEAKS_FOR = {
    "pread": ("native_read", "submit_read", "mapping", "page_cache_reads", "block_status",
              "cache"),
    "pwrite": ("native_write", "submit_write", "stage_write", "page_cache_writes", "zero",
               "trim"),
}


def _owner(cls: type, name: str) -> type:
    """The class of `cls`'s MRO that defines `name`."""
    return next(k for k in cls.__mro__ if name in k.__dict__)


def defined_together(cls: type, first: str, second: str) -> bool:
    """Whether one class of `cls`'s MRO defines both methods, so that what it promises
    of one (a side channel) holds for the other (the data method it speaks for)."""
    return _owner(cls, first) is _owner(cls, second)


def _no_native_write(self, length: int, *, fua: bool = False,
                     nowait: bool = False) -> tuple[int, int] | None:
    return None


def _no_native_read(self, length: int) -> int | None:
    return None


def _no_page_cache_io(self):  # type: ignore[no-untyped-def]
    return None


def _no_submit_read(self, queue, buf, offset: int, token) -> bool:
    return False


def _no_submit_write(self, queue, data, offset: int, token, *, fua: bool = False,
                     done=None) -> bool:
    return False


def _no_stage_write(self, offset: int, length: int) -> WriteStage | None:
    return None


def _no_mapping(self) -> memoryview | None:
    return None


def _all_data(self, offset: int, length: int) -> list[Extent]:
    # "Data" is true of any range, whatever a layer does to it.
    return [Extent(length)]


def _no_cache(self, offset: int, length: int) -> None:
    pass  # advisory: the lower layer's offsets may not be this layer's


def _no_trim(self, offset: int, length: int, *, fua: bool = False) -> None:
    # A trimmed range may read back as anything (doc/proto.md, NBD_CMD_TRIM), so doing
    # nothing is a valid trim, where trimming below could cut what the layer keeps there.
    pass


def _zeros_written(self, offset: int, length: int, *, may_trim: bool = True, fua: bool = False,
                   fast: bool = False) -> None:
    # Zeros below need not read as zeros through this layer: write them through it.
    if fast:
        raise enotsup("fast zeroing through this layer")
    write_zeros(lambda data, at: self.pwrite(data, at, fua=fua), offset, length)


_DECLINED = {
    "native_write": _no_native_write, "native_read": _no_native_read,
    "page_cache_reads": _no_page_cache_io, "page_cache_writes": _no_page_cache_io,
    "submit_read": _no_submit_read, "submit_write": _no_submit_write,
    "stage_write": _no_stage_write, "mapping": _no_mapping,
    "block_status": _all_data, "cache": _no_cache, "trim": _no_trim, "zero": _zeros_written,
}


def enotsup(what: str) -> OSError:
    return OSError(errno.ENOTSUP, f"{what} is not supported")


# --- fallocate(2): Python exposes only posix_fallocate, not the hole-punching modes.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)


def file_extents(fd: int, offset: int, length: int, size: int) -> list[Extent]:
    """Data/hole runs of a sparse file from SEEK_DATA/SEEK_HOLE (holes read as zeros)."""
    end = min(offset + length, size)
    out: list[Extent] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after pos, the rest is a hole
                raise
            data = end
        if data > pos:
            stop = min(data, end)
            out.append(Extent(stop - pos, hole=True, zero=True))
            pos = stop
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        out.append(Extent(hole - pos))
        pos = hole
    return out


_ZEROS = bytes(1 << 20)

# Writes up to this size may run on the event loop (see FileBackend.pwrite).
INLINE_WRITE_MAX = 128 * 1024


def write_zeros(write, offset: int, length: int) -> None:
    """Fallback zeroing by writing a shared zero buffer, 1 MiB at a time."""
    view = memoryview(_ZEROS)
    while length:
        n = min(length, len(_ZEROS))
        write(view[:n], offset)
        offset += n
        length -= n


# --- cache modes -----------------------------------------------------------------------

WRITEBACK = "writeback"
NONE = "none"
CACHE_MODES = (WRITEBACK, NONE)
# O_DIRECT alignment: 4 KiB, the logical block size of every device this runs on and
# the XTS sector, so an encrypted disk's I/O is always aligned. (512 would do on most
# devices; 4096 is never wrong.)
DIRECT_ALIGN = 4096
BOUNCE_MIN = 64 * 1024
BOUNCE_MAX = 1 << 20  # an unaligned request larger than this is bounced in pieces
# O_DIRECT writes: lock stripes of LOCK_STRIPE blocks each. As many as XtsLayer's: a
# ring write (submit_write) that finds its stripe's lock taken goes to a worker, and
# with 64 stripes a quarter of the 4 KiB random writes at qd16 did. Made on first use.
BLOCK_LOCKS = 1024
LOCK_STRIPE = 16


def check_cache_mode(mode: str) -> str:
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES)}, not {mode!r}")
    return mode


def direct_on(fd: int, path: str) -> None:
    """Turn O_DIRECT on for an open file, or say clearly why the file cannot have it (a
    file system without direct I/O, ramfs for one, refuses it with EINVAL)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        # F_SETFL does not check that the file system can do direct I/O; a read does.
        probe = aligned_buffer(DIRECT_ALIGN)
        os.preadv(fd, [probe], 0)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        raise OSError(errno.EINVAL, f"cache=none needs O_DIRECT, which the file system of {path} "
                                    "does not support (ramfs, some FUSE or network file systems); "
                                    "use cache=writeback there") from None


def aligned_buffer(n: int, align: int = DIRECT_ALIGN) -> memoryview:
    """n writable bytes at an address that is a multiple of `align` (a view into a
    slightly larger bytearray: plain heap memory, nothing to free)."""
    raw = bytearray(n + align)
    skip = -_address(raw) % align
    return memoryview(raw)[skip:skip + n]


def aligned(buf: memoryview, offset: int, align: int = DIRECT_ALIGN) -> bool:
    """Whether O_DIRECT can take `buf` at `offset` as it is. A read-only buffer (bytes)
    is taken as unaligned: its address cannot be had without a copy."""
    if (offset | len(buf)) % align or buf.readonly:
        return False
    return _address(buf) % align == 0


def _address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if len(buf) else 0


# Address space that mapping() may take, over all open files: a mapping costs no memory
# (it is the page cache), only virtual addresses, of which x86-64 has 128 TiB. Disks past
# the budget read with pread, which is correct, just one copy slower under XtsLayer.
MAP_BUDGET = 32 << 40
_MAPPED_LOCK = threading.Lock()
_mapped_bytes = 0


class FileBackend(BlockBackend):
    """A disk kept in a sparse regular file, the bottom of every data path.

    TRIM and WRITE_ZEROES punch holes, FLUSH and FUA reach stable storage with
    fdatasync (RWF_DSYNC for FUA writes), and block status comes from SEEK_DATA/SEEK_HOLE.
    With `cache="none"` the file is opened with O_DIRECT (see the module's docstring).
    """

    def __init__(self, path: str | os.PathLike, *, size: int | None = None, readonly: bool = False,
                 cache: str = WRITEBACK):
        self.path = os.fspath(path)
        self._readonly = readonly
        self.cache_mode = check_cache_mode(cache)
        self._direct = cache == NONE
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if size is not None and not readonly:
            flags |= os.O_CREAT
        self._fd = os.open(self.path, flags | os.O_CLOEXEC, 0o600)
        try:
            if size is not None and not readonly and os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
            if self._direct:
                if os.fstat(self._fd).st_size % DIRECT_ALIGN:
                    # A partial last block could only be written whole, growing the file.
                    raise OSError(errno.EINVAL, f"cache=none needs a size that is a multiple of "
                                                f"{DIRECT_ALIGN} bytes ({self.path})")
                direct_on(self._fd, self.path)
        except BaseException:
            os.close(self._fd)
            raise
        self._size = os.fstat(self._fd).st_size
        self._nowait_ok = True  # cleared if the kernel/filesystem rejects RWF_NOWAIT
        # page_cache_reads speaks for this class's pread, not a subclass's own.
        self._vouched = defined_together(type(self), "pread", "page_cache_reads")
        self._write_vouched = defined_together(type(self), "pwrite", "page_cache_writes")
        self._mapping: memoryview | None = None  # made by mapping() on first use
        self._map_failed = False
        self._closed = threading.Event()
        # O_DIRECT: per-thread aligned bounce buffers, and the locks that order a partial
        # block's read-modify-write against every other write of that block.
        self._local = threading.local()
        self._block_locks: list[threading.Lock | None] = [None] * BLOCK_LOCKS if self._direct else []
        self._making_lock = threading.Lock()
        self._caps = Capabilities(
            writable=not readonly, flush=not readonly, fua=not readonly,
            trim=not readonly, zero=not readonly, fast_zero=not readonly,
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def fileno(self) -> int:
        return self._fd

    @property
    def io_align(self):
        return DIRECT_ALIGN if self._direct else 0

    def pread(self, buf, offset, *, nowait=False):
        buf = memoryview(buf).cast("B")
        flags = 0
        if nowait:
            if not self._nowait_ok or self._direct:
                # O_DIRECT has no page cache to hit: RWF_NOWAIT would still wait for the
                # device, on the event loop.
                raise BlockingIOError(errno.EAGAIN, "nowait unsupported")
            flags = os.RWF_NOWAIT
        if self._direct and not aligned(buf, offset):
            self._bounced_read(buf, offset)
            return
        done = 0
        total = len(buf)
        while done < total:
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done, flags)
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP and nowait:
                    self._nowait_ok = False
                    raise BlockingIOError(errno.EAGAIN, "nowait unsupported") from None
                raise
            if n == 0:  # beyond the end of the file: zeros, like a hole
                buf[done:] = bytes(total - done)
                return
            done += n

    def native_read(self, length):
        # pread is preadv on this fd with zeros past the end: exactly what the queue does
        # (through an aligned bounce buffer where io_align asks for one).
        return self._fd if not self._closed.is_set() else None

    def page_cache_reads(self):
        if self._direct or not self._nowait_ok or self._closed.is_set() or not self._vouched:
            return None
        return self._fd, None, 1

    def page_cache_writes(self):
        if self._direct or self._readonly or self._closed.is_set() or not self._write_vouched:
            return None
        return self._fd, None, 1, None, 0

    def pwrite(self, data, offset, *, fua=False, nowait=False, owned=False):
        data = memoryview(data).cast("B")
        if self._direct:
            self._direct_write(data, offset, fua=fua, nowait=nowait)
            return
        fd, flags = self._write_target(len(data), fua=fua, nowait=nowait)
        done = 0
        while done < len(data):
            done += os.pwritev(fd, [data[done:]], offset + done, flags)

    def native_write(self, length, *, fua=False, nowait=False):
        # pwrite's checks, and where and how it writes: (fd, pwritev2 flags).
        if self._readonly:
            raise OSError(errno.EPERM, "read-only")
        if nowait and (fua or length > INLINE_WRITE_MAX or self._direct):
            raise BlockingIOError(errno.EAGAIN, "large, FUA or O_DIRECT write: use a worker")
        if self._direct:
            # Not a plain pwritev2 of the caller's buffer: O_DIRECT needs it aligned.
            return None
        # Buffered RWF_NOWAIT writes are not supported by ext4 (EOPNOTSUPP, seen on 6.18),
        # so a small buffered write is taken as cheap: it lands in the page cache and
        # blocks only under writeback throttling, which then slows every client alike.
        return self._fd, os.RWF_DSYNC if fua else 0

    # pwrite's own copy: a subclass that overrides native_write leaves pwrite alone.
    _write_target = native_write

    def flush(self):
        os.fdatasync(self._fd)

    def trim(self, offset, length, *, fua=False):
        if self._readonly:
            raise OSError(errno.EPERM, "read-only")
        try:
            punch_hole(self._fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # TRIM is advisory (doc/proto.md): doing nothing is correct.
        if fua:
            self.flush()

    def zero(self, offset, length, *, may_trim=True, fua=False, fast=False):
        if self._readonly:
            raise OSError(errno.EPERM, "read-only")
        try:
            if may_trim:
                punch_hole(self._fd, offset, length)
            else:
                zero_range(self._fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if fast:
                raise enotsup("fast zeroing") from None
            write_zeros(lambda d, o: self.pwrite(d, o), offset, length)
        if fua:
            self.flush()

    def block_status(self, offset, length):
        return file_extents(self._fd, offset, length, self._size)

    def cache(self, offset, length):
        if not self._direct:  # O_DIRECT never reads from the page cache: nothing to warm
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def mapping(self):
        global _mapped_bytes
        if self._direct:  # a mapping reads through the page cache, which cache=none avoids
            return None
        view = self._mapping
        if view is None and not self._map_failed and not self._closed.is_set():
            with _MAPPED_LOCK:
                if self._mapping is None and 0 < self._size and _mapped_bytes + self._size <= MAP_BUDGET:
                    try:
                        self._mapping = memoryview(mmap.mmap(self._fd, self._size, mmap.MAP_SHARED,
                                                             mmap.PROT_READ))
                        _mapped_bytes += self._size
                    except (OSError, ValueError):  # no mmap here (some FUSE/network files)
                        self._map_failed = True
                view = self._mapping
        return view

    def grow(self, size):
        if size < self._size or size % (DIRECT_ALIGN if self._direct else 1):
            raise OSError(errno.EINVAL, f"cannot grow {self.path} from {self._size} to {size} bytes")
        if os.fstat(self._fd).st_size < size:
            raise OSError(errno.EINVAL, f"{self.path} holds fewer than {size} bytes: extend it first")
        # A mapping made before keeps its length: reads past it take pread (XtsLayer checks).
        self._size = size

    def close(self):
        if not self._closed.is_set():
            self._closed.set()
            self._unmap()
            os.close(self._fd)

    # --- O_DIRECT (cache=none) ----------------------------------------------------------

    def _bounce(self, n: int) -> memoryview:
        """This thread's aligned bounce buffer, at least n bytes (grown as needed)."""
        view = getattr(self._local, "bounce", None)
        if view is None or len(view) < n:
            view = self._local.bounce = aligned_buffer(max(n, BOUNCE_MIN))
        return view[:n]

    def _bounced_read(self, buf: memoryview, offset: int) -> None:
        """pread of an unaligned buffer or range: the aligned blocks around it, through
        the bounce buffer, BOUNCE_MAX at a time."""
        pos, end = offset, offset + len(buf)
        while pos < end:
            lo = pos - pos % DIRECT_ALIGN
            hi = min(-(-end // DIRECT_ALIGN) * DIRECT_ALIGN, lo + BOUNCE_MAX)
            bounce = self._bounce(hi - lo)
            self._read_aligned(bounce, lo)
            stop = min(end, hi)
            buf[pos - offset:stop - offset] = bounce[pos - lo:stop - lo]
            pos = stop

    def _read_aligned(self, buf: memoryview, offset: int) -> None:
        done, total = 0, len(buf)
        while done < total:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:  # past the end of the file (a short last block): zeros
                buf[done:] = bytes(total - done)
                return
            done += n

    def _direct_write(self, data: memoryview, offset: int, *, fua: bool, nowait: bool) -> None:
        """pwrite through O_DIRECT: an aligned buffer goes straight down; an unaligned one
        is copied into the bounce buffer; a partial block at either end is read, patched
        and written back, under the locks of the blocks written (any write of them, so
        a read-modify-write never undoes a write that ran meanwhile)."""
        if self._readonly:
            raise OSError(errno.EPERM, "read-only")
        if nowait:
            raise BlockingIOError(errno.EAGAIN, "O_DIRECT write: use a worker")
        if not data:
            return
        flags = os.RWF_DSYNC if fua else 0
        end = offset + len(data)
        locks = self._locks_of(offset // DIRECT_ALIGN, -(-end // DIRECT_ALIGN))
        for lock in locks:
            lock.acquire()
        try:
            if aligned(data, offset):
                self._write_aligned(data, offset, flags)
                return
            pos = offset
            while pos < end:
                lo = pos - pos % DIRECT_ALIGN
                hi = min(-(-end // DIRECT_ALIGN) * DIRECT_ALIGN, lo + BOUNCE_MAX)
                stop = min(end, hi)
                bounce = self._bounce(hi - lo)
                if pos > lo:  # a partial first block: its old bytes first
                    self._read_aligned(bounce[:DIRECT_ALIGN], lo)
                if stop < hi and not (pos > lo and hi - lo == DIRECT_ALIGN):  # partial last
                    self._read_aligned(bounce[hi - lo - DIRECT_ALIGN:], hi - DIRECT_ALIGN)
                bounce[pos - lo:stop - lo] = data[pos - offset:stop - offset]
                self._write_aligned(bounce, lo, flags)
                pos = stop
        finally:
            for lock in reversed(locks):
                lock.release()

    def submit_write(self, queue, data, offset, token, *, fua=False, done=None):
        # O_DIRECT only (a buffered write is answered inline), whole blocks only (a
        # partial one is read-modify-write on a worker), and only when no write of
        # these blocks runs now: the loop takes the block locks without waiting, and
        # the queue gives them back when the write is reported (or dropped at close).
        submit = getattr(queue, "submit_write", None)  # the thread queue cannot write
        if not self._direct or submit is None or self._closed.is_set():
            return False  # closed: its fd number may be another file's by now
        if self._readonly:
            raise OSError(errno.EPERM, "read-only")
        n = len(data)
        if not n or (offset | n) % DIRECT_ALIGN:
            return False
        locks = self._locks_of(offset // DIRECT_ALIGN, (offset + n) // DIRECT_ALIGN)
        for i, lock in enumerate(locks):
            if not lock.acquire(False):
                for taken in reversed(locks[:i]):
                    taken.release()
                return False
        if done is not None or len(locks) > 1:
            release = partial(_release_all, locks, done)
        else:
            release = locks[0].release
        try:
            submit(token, data, self._fd, offset, fua=fua, align=DIRECT_ALIGN, done=release)
        except BaseException:
            _release_all(locks)
            raise
        return True

    def _write_aligned(self, buf: memoryview, offset: int, flags: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwritev(self._fd, [buf[done:]], offset + done, flags)

    def _locks_of(self, first: int, end: int) -> list:
        """The block locks of blocks [first, end), each once, in index order (so two
        writes never wait for each other in a cycle)."""
        stripes = range(first // LOCK_STRIPE, (end - 1) // LOCK_STRIPE + 1)
        if len(stripes) >= BLOCK_LOCKS:
            return [self._block_lock(i) for i in range(BLOCK_LOCKS)]
        return [self._block_lock(i) for i in sorted({s % BLOCK_LOCKS for s in stripes})]

    def _block_lock(self, i: int) -> threading.Lock:
        lock = self._block_locks[i]
        if lock is None:
            with self._making_lock:  # one lock per stripe, whichever thread makes it
                lock = self._block_locks[i]
                if lock is None:
                    lock = self._block_locks[i] = threading.Lock()
        return lock

    def _unmap(self):
        global _mapped_bytes
        view, self._mapping = self._mapping, None
        if view is None:
            return
        with _MAPPED_LOCK:
            _mapped_bytes -= len(view)  # what was mapped: the size may have grown since
        mm = view.obj
        try:
            view.release()
            mm.close()
        except BufferError:
            # A reader still holds a slice (close() normally runs after I/O drained): the
            # mapping goes away with the last reference instead, never under a reader.
            pass


def _release_all(locks: list, then=None) -> None:
    for lock in reversed(locks):
        lock.release()
    if then is not None:
        then()


@dataclass(frozen=True, slots=True)
class FileSpec:
    """How to open a disk's file, as plain data: what another process (an I/O worker)
    needs to open the same disk the same way. The key of an encrypted one is never part
    of it; `nbdserver.crypto.open_disk(spec, key)` puts the layer on."""

    path: str
    size: int | None = None        # create or resize to this; None: as the file is
    readonly: bool = False
    cache: str = WRITEBACK         # CACHE_MODES
    encrypted: bool = False

    def __post_init__(self):
        check_cache_mode(self.cache)

    def open(self) -> FileBackend:
        """The file's backend (never the encryption layer: see crypto.open_disk)."""
        return FileBackend(self.path, size=self.size, readonly=self.readonly, cache=self.cache)

    def with_cache(self, cache: str) -> FileSpec:
        return replace(self, cache=cache)
