"""A histogram of durations with fixed buckets, cheap enough for every NBD request: one
bisect and one list increment per observation, no lock (each is updated on one event
loop), exported to Prometheus at scrape time by daemonkit.metrics."""

from __future__ import annotations

import bisect

# Seconds: from a page-cache hit (tens of microseconds) to a stalled disk or key service.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS_NS = tuple(int(b * 1e9) for b in LATENCY_BUCKETS)


class Latency:
    """A histogram of durations in nanoseconds: `counts[i]` observations at most
    `LATENCY_BUCKETS[i]` (and above the previous bound), the last slot for the rest."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS_NS) + 1)
        self.sum_ns = 0

    def observe_ns(self, ns: int) -> None:
        self.counts[bisect.bisect_left(_BOUNDS_NS, ns)] += 1
        self.sum_ns += ns

    def observe(self, seconds: float) -> None:
        self.observe_ns(int(seconds * 1e9))

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Prometheus's cumulative buckets, ending with +Inf."""
        out, total = [], 0
        for bound, n in zip(LATENCY_BUCKETS + (float("inf"),), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out
