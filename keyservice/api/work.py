"""Expensive work (RSA key generation, parsing and checking an imported private key)
runs here, off the domain thread and only after the call was authorized.

Why: the domain thread serialises every call, so one RSA-4096 generation there (about
half a second, seconds under load) delays the owner's `disable` behind it, and with it
revocation. Here a small pool does that work (`cryptography` releases the GIL while
OpenSSL generates or checks a key, so threads run it in parallel with the event loop and
the domain thread), and the domain thread does only short work: authorize before,
commit (re-checking state) after.

Admission, per identity: at most `per_identity` jobs at once and a token bucket
counted in units of one RSA-2048 generation (`cost`: generation time grows with about
the cube of the size, so RSA-4096 costs 8), `burst` units refilled at `rate` per second;
over the whole service at most `queued` jobs admitted. A refusal is 429 with Retry-After,
so one caller cannot queue up hours of key generation ahead of everyone else's.

Buckets are kept only while they matter: past `BUCKETS` identities, adding one first
forgets every bucket that has refilled. A full bucket admits exactly what a new one
would, so no answer changes; the table holds the identities that spent tokens lately,
not every identity that ever made a key (deleted ones included).
"""
import asyncio
import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..domain.errors import TooManyRequests


@dataclass(frozen=True)
class WorkLimits:
    workers: int = 2  # the machine's cores; more only makes each job slower
    per_identity: int = 2
    burst: float = 240.0  # units (RSA-2048 generations)
    rate: float = 8.0  # units per second per identity, sustained: one RSA-4096 a second
    queued: int = 32


BUCKETS = 1024  # identities with a bucket before the refilled ones are forgotten


def cost(size: int | None) -> float:
    """Units of work for a key of `size` bits (None: an import, size unknown until parsed)."""
    return 4.0 if size is None else (size / 2048) ** 3


class TokenBucket:
    def __init__(self, burst: float, rate: float, now: float):
        self.burst, self.rate = burst, rate
        self.tokens, self.stamp = burst, now

    def take(self, now: float, amount: float) -> float:
        """0 if `amount` was taken, else the seconds until it is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """Refilled to `burst` by `now`: the same as a bucket made now."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class ExpensiveWork:
    """Used from the event loop only (admission state needs no lock)."""

    def __init__(self, limits: WorkLimits = WorkLimits(), clock=time.monotonic):
        self.limits = limits
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="keyservice-work")
        self._running: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = BUCKETS  # doubles past what a sweep keeps: amortised O(1) a call
        self._admitted = 0

    async def run(self, who: str, what: str, units: float, fn, *args):
        self._admit(who, what, min(units, self.limits.burst))
        self._admitted += 1
        self._running[who] = self._running.get(who, 0) + 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(fn, *args))
        finally:
            self._admitted -= 1
            self._running[who] -= 1
            if not self._running[who]:
                del self._running[who]

    def _admit(self, who: str, what: str, units: float) -> None:
        lim = self.limits
        if self._running.get(who, 0) >= lim.per_identity:
            raise TooManyRequests(f"Too many {what} operations in progress for '{who}' (at most "
                                  f"{lim.per_identity} at once); retry later", retry_after=1)
        if self._admitted >= lim.queued:
            raise TooManyRequests(f"The service is busy with {lim.queued} key operations; retry later",
                                  retry_after=1)
        now = self._clock()
        bucket = self._buckets.get(who)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            bucket = self._buckets[who] = TokenBucket(lim.burst, lim.rate, now)
        wait = bucket.take(now, units)
        if wait:
            raise TooManyRequests(f"Rate limit for key generation and import exceeded for '{who}' "
                                  f"(about {lim.rate / 8:g} RSA-4096 keys per second); retry in "
                                  f"{math.ceil(wait)} s", retry_after=max(1, math.ceil(wait)))

    def _sweep(self, now: float) -> None:
        """Forget the buckets that have refilled (see the module docstring)."""
        self._buckets = {who: b for who, b in self._buckets.items() if not b.full(now)}
        self._sweep_at = max(BUCKETS, 2 * len(self._buckets))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
