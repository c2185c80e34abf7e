"""nbdserver's Prometheus metrics, read at scrape time from what the daemon already counts.

Nothing here runs per request: the server counts each request on its export's
`ExportStats` (nbdserver/iostats.py), `KeyAccess` its revocations, and the key-service
client its calls (`keyservice.client.CallTally`); `PlatformCollector.collect` turns
those into metric families when Prometheus asks.

Per-disk series name the disk, and a disk's name is its tenant's: they go only to a
scraper on loopback or one that presents the API token. Anyone else gets the same
metrics summed over every disk, with the label `disk="(all)"` and no per-set grace
series (docs/operations.md, "Monitoring").
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from daemonkit.fips import FipsCollector
from daemonkit.latency import Latency
from daemonkit.metrics import histogram
from keyservice.client import CallTally

from .exports import ExportCatalog, ExportState
from .health import grace_remaining
from .iostats import COMMANDS, ExportStats
from .platform.access import KeyAccess
from .protocol.constants import (
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOMEM,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EOVERFLOW,
    NBD_EPERM,
    NBD_ESHUTDOWN,
)

ALL = "(all)"  # the disk label of series summed over every disk
STATES = ("available", "locked", "frozen")
_ERRNO_NAMES = {NBD_EPERM: "EPERM", NBD_EIO: "EIO", NBD_ENOMEM: "ENOMEM", NBD_EINVAL: "EINVAL",
                NBD_ENOSPC: "ENOSPC", NBD_EOVERFLOW: "EOVERFLOW", NBD_ENOTSUP: "ENOTSUP",
                NBD_ESHUTDOWN: "ESHUTDOWN"}


def state_of(export) -> str:
    if export.state is ExportState.LOCKED:
        return "locked"
    return "frozen" if export.is_frozen else "available"


class PlatformCollector:
    """A prometheus_client collector over the daemon's own counters."""

    def __init__(self, catalog: ExportCatalog, access: KeyAccess, *, tally: CallTally | None,
                 connections=lambda: 0, per_disk: bool = True):
        self.catalog = catalog
        self.access = access
        self.tally = tally
        self.connections = connections
        self.per_disk = per_disk

    def collect(self) -> Iterator[Metric]:
        yield from self._io()
        yield from self._disks()
        yield from self._revocations()
        yield from self._keyservice()

    # -- the data path
    def _grouped(self) -> list[tuple[str, list]]:
        """(disk label, exports): one per disk, or all of them under ALL."""
        exports = list(self.catalog)
        if self.per_disk:
            return [(e.name, [e]) for e in exports]
        return [(ALL, exports)]

    def _io(self) -> Iterator[Metric]:
        reqs = CounterMetricFamily("nbdserver_io_requests", "NBD requests started, by command",
                                   labels=["disk", "command"])
        moved = CounterMetricFamily("nbdserver_io_bytes",
                                    "bytes the NBD requests cover (read, written, trimmed...)",
                                    labels=["disk", "command"])
        errors = CounterMetricFamily("nbdserver_io_errors", "NBD requests failed, by NBD error",
                                     labels=["disk", "errno"])
        inflight = GaugeMetricFamily("nbdserver_io_inflight",
                                     "NBD requests running off the event loop (workers, read queue)",
                                     labels=["disk"])
        clients = GaugeMetricFamily("nbdserver_disk_clients", "NBD connections attached to the disk",
                                    labels=["disk"])
        latency_series = []
        for label, exports in self._grouped():
            stats = [s for e in exports if (s := e.stats_if_used) is not None]
            for i, cmd in enumerate(COMMANDS):
                n = sum(s.requests[i] for s in stats)
                if not n:
                    continue  # a series per command ever used, not nine per disk
                reqs.add_metric([label, cmd], n)
                moved.add_metric([label, cmd], sum(s.bytes[i] for s in stats))
                latency_series.append(([label, cmd], _merged(s.latency[i] for s in stats)))
            for errno, n in _sum_errors(stats).items():
                errors.add_metric([label, _ERRNO_NAMES.get(errno, str(errno))], n)
            inflight.add_metric([label], sum(e.inflight for e in exports))
            clients.add_metric([label], sum(e.clients for e in exports))
        yield from (reqs, moved, errors, inflight, clients)
        yield histogram("nbdserver_io_latency_seconds",
                        "NBD request latency, by command (of one request in 16 of each connection)",
                        ["disk", "command"], latency_series)
        yield GaugeMetricFamily("nbdserver_nbd_connections", "open NBD connections (all phases)",
                                value=self.connections())

    # -- the disks' serving state
    def _disks(self) -> Iterator[Metric]:
        exports = list(self.catalog)
        counts = GaugeMetricFamily("nbdserver_disks", "disks by serving state", labels=["state"])
        for state in STATES:
            counts.add_metric([state], sum(1 for e in exports if state_of(e) == state))
        yield counts
        reasons: dict[str, int] = {}
        for e in exports:
            if e.locked:
                reason = self.reason_class(e.name)
                reasons[reason] = reasons.get(reason, 0) + 1
        locked = GaugeMetricFamily("nbdserver_disks_locked", "locked disks, by reason",
                                   labels=["reason"])
        for reason, n in sorted(reasons.items()):
            locked.add_metric([reason], n)
        yield locked
        if not self.per_disk:
            return
        states = GaugeMetricFamily("nbdserver_disk_state", "1 for the disk's serving state",
                                   labels=["disk", "state"])
        lock = GaugeMetricFamily("nbdserver_disk_lock_reason", "1 for a locked disk's reason",
                                 labels=["disk", "reason"])
        for e in exports:
            now = state_of(e)
            for s in STATES:
                states.add_metric([e.name, s], 1 if s == now else 0)
            if e.locked:
                lock.add_metric([e.name, self.reason_class(e.name)], 1)
        yield states
        yield lock

    def reason_class(self, disk: str) -> str:
        """revoked (the key refused), unreachable (past the grace period), or other (a
        delete or a shutdown in progress)."""
        return self.access.cause.get(disk, "other")

    # -- revocation and the key service
    def _revocations(self) -> Iterator[Metric]:
        yield CounterMetricFamily("nbdserver_revocations", "disks locked because their key was refused",
                                  value=self.access.revocations)
        yield histogram("nbdserver_revocation_latency_seconds",
                        "from the start of the key check that met a refusal to the disks locked",
                        [], [([], self.access.revocation_latency)])

    def _keyservice(self) -> Iterator[Metric]:
        calls = CounterMetricFamily("nbdserver_keyservice_calls", "calls to the key service",
                                    labels=["operation", "outcome"])
        series = []
        if self.tally is not None:
            for (op, outcome), n in sorted(self.tally.calls.items()):
                calls.add_metric([op, outcome], n)
            series = [([op], h) for op, h in sorted(self.tally.latency.items())]
        yield calls
        yield histogram("nbdserver_keyservice_call_latency_seconds", "key service call latency",
                        ["operation"], series)
        yield GaugeMetricFamily("nbdserver_keyservice_stream_connected",
                                "1 while the key service's change stream is followed",
                                value=1 if self.access.stream_connected else 0)
        remaining = grace_remaining(self.access)
        yield GaugeMetricFamily("nbdserver_keyservice_grace_remaining_seconds",
                                "least time left, over all key scopes, before disks close for an "
                                "unreachable key service (the grace period when none is in use)",
                                value=min(remaining.values(), default=self.access.grace))
        if self.per_disk:
            g = GaugeMetricFamily("nbdserver_keyservice_scope_grace_remaining_seconds",
                                  "time left before the scope's disks close for an unreachable "
                                  "key service", labels=["scope"])
            for scope, left in sorted(remaining.items()):
                g.add_metric([scope], left)
            yield g


def registry_for(collector: PlatformCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]  # a collector by duck typing
    registry.register(FipsCollector("nbdserver"))  # type: ignore[arg-type]
    return registry


def _merged(histograms) -> Latency:
    out = Latency()
    for h in histograms:
        out.counts = [a + b for a, b in zip(out.counts, h.counts, strict=True)]
        out.sum_ns += h.sum_ns
    return out


def _sum_errors(stats: list[ExportStats]) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in stats:
        for errno, n in s.errors.items():
            out[errno] = out.get(errno, 0) + n
    return out
