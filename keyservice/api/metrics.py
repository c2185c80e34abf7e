"""The key service's Prometheus metrics: `GET /metrics`, no token.

Counted on the request path in plain ints (`ApiTally.record`, once per call, in the
`edge` middleware) and turned into metrics at scrape time (daemonkit/metrics.py says
why). Labels are route names, outcomes and error codes, never a vault, key or identity:
nothing here belongs to a tenant, so the endpoint needs no token, like `/health`.
"""
from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from daemonkit.fips import FipsCollector
from daemonkit.latency import Latency
from daemonkit.metrics import histogram, metrics_response


class ApiTally:
    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}  # (operation, result) -> count
        self.latency: dict[str, Latency] = {}
        self.subscribers = 0  # change streams open now

    def record(self, operation: str, error_code: str | None, started: float) -> None:
        key = (operation, error_code or "ok")
        self.calls[key] = self.calls.get(key, 0) + 1
        h = self.latency.get(operation)
        if h is None:
            h = self.latency[operation] = Latency()
        h.observe(time.monotonic() - started)


class KeyServiceCollector:
    def __init__(self, tally: ApiTally, audit: tuple[int, int]):
        self.tally = tally
        self.audit = audit  # (chains, entries), read on the domain thread by the handler

    def collect(self):
        calls = CounterMetricFamily("keyservice_operations", "API operations, by route and result "
                                    "(ok, or the error code answered)", labels=["operation", "result"])
        for (op, result), n in sorted(self.tally.calls.items()):
            calls.add_metric([op, result], n)
        yield calls
        # KeyWrap, KeyUnwrap (and their *Version routes): what the disk platform waits
        # for whenever a disk opens.
        yield histogram("keyservice_operation_latency_seconds", "API operation latency, by route",
                        ["operation"], [([op], h) for op, h in sorted(self.tally.latency.items())])
        yield GaugeMetricFamily("keyservice_event_subscribers", "change streams open now",
                                value=self.tally.subscribers)
        chains, entries = self.audit
        yield GaugeMetricFamily("keyservice_audit_chains", "audit chains (one per vault, and the "
                                "directory's)", value=chains)
        yield GaugeMetricFamily("keyservice_audit_entries", "audit entries over all chains",
                                value=entries)


async def metrics(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    audit = await domain.run(domain.service.store.audit_totals)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KeyServiceCollector(request.app["tally"], audit))  # type: ignore[arg-type]
    registry.register(FipsCollector("keyservice"))  # type: ignore[arg-type]
    return metrics_response(registry)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/metrics", metrics, name="Metrics")
