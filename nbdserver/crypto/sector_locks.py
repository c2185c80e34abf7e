"""Striped locks over sector ranges: the ordering of writes that share a sector.

A sub-sector write is a read-modify-write of its sector; if another write to that sector
lands between the read and the write-back, one of them is lost or the sector is torn
(bytes from neither writer's view). So every write, trim and zero holds the locks of the
sectors it touches, full-sector writes included: an aligned write that slipped between an
RMW's read and write-back would be overwritten with stale bytes.

There is no global lock. Sector `s` belongs to stripe `(s // SECTORS_PER_STRIPE) %
STRIPES`; a request takes the stripes its sectors map to, in ascending stripe order, so
two requests never wait on each other in a cycle. Stripes of 16 sectors (64 KiB) keep a
1 MiB write to 16-17 lock operations while unrelated 4 KiB writes rarely share one. A
request spanning every stripe (64 MiB and more) takes them all, which serialises it
with everything else; NBD requests are at most 32 MiB, so only whole-disk trims do this.

Reads take no lock: a read overlapping an in-flight write may see either version of a
sector (NBD gives no order between overlapping in-flight requests, doc/proto.md
"Ordering of messages and writes").

Across processes (the I/O workers, nbdserver/iopool.py, each with its own layer over the
same file): a thread lock orders nothing outside its process, so `acquire` (the path of
every read-modify-write, trim and zero, and of writes wider than one stripe) also takes
an open-file-description lock (fcntl F_OFD_SETLKW) on the file, over the byte range
[first, end): sector numbers used as byte offsets, which every process does alike. Two
sub-sector writes to one sector from two processes are then ordered, and neither is
lost. The short path of a small aligned write (`single`, and XtsLayer's pwrite) takes no
file lock: such a write overlaps, byte for byte, any RMW of its sector, and NBD orders
no overlapping writes in flight; within one process the stripe lock still orders them.
OFD locks belong to the open file, not the thread, so they never exclude a process's
own threads from each other (the stripe locks do that, and are always taken first: the
file ranges held at once in one process are disjoint), and the kernel releases them when
a process dies.
"""

from __future__ import annotations

import fcntl
import struct
import threading
from typing import Literal, TypeAlias, overload

STRIPES = 1024
SECTORS_PER_STRIPE = 16


# struct flock (x86-64 and every LP64 Linux): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("@hhqqi4x")


class FileRange:
    """An OFD write lock on [first, end) of a file (see the module docstring)."""

    __slots__ = ("fd", "first", "end")

    def __init__(self, fd: int, first: int, end: int) -> None:
        self.fd, self.first, self.end = fd, first, end

    def acquire(self, blocking: bool = True) -> bool:
        arg = _FLOCK.pack(fcntl.F_WRLCK, 0, self.first, self.end - self.first, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK, arg)
        except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: another holds it
            if blocking:
                raise
            return False
        return True

    def release(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK,
                    _FLOCK.pack(fcntl.F_UNLCK, 0, self.first, self.end - self.first, 0))


# What acquire() took, for release(): stripe locks, then the file's range if any.
Held: TypeAlias = "list[threading.Lock | FileRange]"


class SectorLocks:
    """Stripe locks are made on first use: a disk pays for the locks of the stripes it
    has written, not for all 1,024 of them at open (about 100 KiB a disk, which
    dominated what an attached, idle disk costs the server)."""

    def __init__(self, stripes: int = STRIPES, sectors_per_stripe: int = SECTORS_PER_STRIPE, *,
                 file_fd: int | None = None) -> None:
        # Stripe (s // sectors_per_stripe) % stripes, None until first used.
        self._locks: list[threading.Lock | None] = [None] * stripes
        self._fd = file_fd  # the file whose byte ranges order RMW across processes
        self._per = sectors_per_stripe
        self._making = threading.Lock()

    def stripes(self) -> tuple[list[threading.Lock | None], int]:
        """The stripe locks (None until made) and the sectors per stripe: for the
        server's native small writes (nbdserver/_cachedio.c), which take the lock of
        sectors [first, end) as `single` would, and leave the write to Python when that
        lock is not made yet."""
        return self._locks, self._per

    def stripe(self, i: int) -> threading.Lock:
        """Stripe i's lock, made on its first use (by one thread only: two threads must
        never end up with two different locks for one stripe)."""
        lock = self._locks[i]
        if lock is None:
            with self._making:
                lock = self._locks[i]
                if lock is None:
                    lock = self._locks[i] = threading.Lock()
        return lock

    @overload
    def acquire(self, first: int, end: int, *, blocking: Literal[True] = True) -> Held: ...
    @overload
    def acquire(self, first: int, end: int, *, blocking: bool) -> Held | None: ...

    def acquire(self, first: int, end: int, *, blocking: bool = True) -> Held | None:
        """Take the locks of sectors [first, end) (end > first), and the file's range of
        them if there is a file; returns them for release(). With blocking=False, None
        (and nothing held) if any of them is taken."""
        n = len(self._locks)
        g0 = first // self._per
        g1 = (end - 1) // self._per
        order: range | list[int]
        if g1 - g0 + 1 >= n:
            order = range(n)
        else:
            a, b = g0 % n, g1 % n
            # Ascending stripe index in both cases: the global order that rules out deadlock.
            order = range(a, b + 1) if a <= b else [*range(b + 1), *range(a, n)]
        stripe = self.stripe
        held: Held = [stripe(i) for i in order]
        if self._fd is not None:  # last: taken once this process's own writers are excluded
            held.append(FileRange(self._fd, first, end))
        if blocking:
            for i, lock in enumerate(held):
                try:
                    lock.acquire()
                except BaseException:  # the file lock failed (EINTR, ENOLCK): hold nothing
                    for taken in reversed(held[:i]):
                        taken.release()
                    raise
            return held
        for i, lock in enumerate(held):
            if not lock.acquire(False):
                for taken in reversed(held[:i]):
                    taken.release()
                return None
        return held

    def single(self, first: int, end: int) -> threading.Lock | None:
        """The one lock of sectors [first, end) when they share a stripe, else None
        (then use acquire/release). No file range: the short path of a small aligned
        write (see the module's docstring), which asks for every write it takes, so
        the lock is looked up here without a second call once it exists."""
        per = self._per
        g = first // per
        if g != (end - 1) // per:
            return None
        locks = self._locks
        i = g % len(locks)
        return locks[i] or self.stripe(i)

    @staticmethod
    def release(held: Held) -> None:
        for lock in reversed(held):
            lock.release()
