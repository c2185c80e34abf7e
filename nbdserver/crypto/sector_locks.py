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
"""

from __future__ import annotations

import threading

STRIPES = 1024
SECTORS_PER_STRIPE = 16


class SectorLocks:
    """Stripe locks are made on first use: a disk pays for the locks of the stripes it
    has written, not for all 1,024 of them at open (about 100 KiB a disk, which
    dominated what an attached, idle disk costs the server)."""

    def __init__(self, stripes: int = STRIPES, sectors_per_stripe: int = SECTORS_PER_STRIPE):
        self._locks: list[threading.Lock | None] = [None] * stripes
        # read-only: stripe (s // sectors_per_stripe) % stripes, None until first used
        self.stripes = self._locks
        self._per = sectors_per_stripe
        self._making = threading.Lock()

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

    def acquire(self, first: int, end: int, *, blocking: bool = True) -> list[threading.Lock] | None:
        """Take the locks of sectors [first, end) (end > first); returns them for release().
        With blocking=False, None (and nothing held) if any of them is taken."""
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
        held = [stripe(i) for i in order]
        if blocking:
            for lock in held:
                lock.acquire()
            return held
        for i, lock in enumerate(held):
            if not lock.acquire(False):
                for taken in reversed(held[:i]):
                    taken.release()
                return None
        return held

    def single(self, first: int, end: int) -> threading.Lock | None:
        """The one lock of sectors [first, end) when they share a stripe, else None
        (then use acquire/release). The fast path of a small write."""
        per = self._per
        g = first // per
        if g != (end - 1) // per:
            return None
        return self.stripe(g % len(self._locks))

    @staticmethod
    def release(held: list[threading.Lock]) -> None:
        for lock in reversed(held):
            lock.release()
