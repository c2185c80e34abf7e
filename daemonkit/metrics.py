"""Prometheus metrics for both daemons: counted cheaply, turned into metrics at scrape time.

The hot paths (an NBD request, an API call) never touch prometheus_client: they add to
plain ints and lists on small objects of their own, and a custom collector reads those
when Prometheus scrapes. A `prometheus_client.Counter.inc()` takes a lock and walks
label dictionaries, which per NBD request is more than the request's own Python work
is allowed to grow by (docs/operations.md, "Monitoring").

`latency.Latency` holds durations and `histogram` exports them; `metrics_response`
renders a registry; `MetricsListener` serves it on a listener of its own
(`--metrics-listen`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily

from .httpguard import GuardedRunner, HttpLimits
from .latency import Latency

log = logging.getLogger("metrics")
# A scraper or two and the probes: a few connections are plenty, and a flood of them
# must not take the daemon's descriptors.
LISTENER_LIMITS = HttpLimits(max_connections=32)


def histogram(name: str, doc: str, labels: list[str],
              series: Iterable[tuple[list[str], Latency]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in series:
        family.add_metric(values, h.buckets(), h.sum_ns / 1e9)
    return family


def metrics_response(registry: CollectorRegistry) -> web.Response:
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsListener:
    """A listener of its own for Prometheus: `GET /metrics` (and the health endpoints the
    daemon hands over), nothing else, so a scraper needs no access to the API's port."""

    def __init__(self, routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]],
                 shared: dict | None = None):
        app = web.Application()
        for key, value in (shared or {}).items():  # what the handlers read from request.app
            app[key] = value
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        # Slowloris-guarded and capped like the APIs: the port is often open to a network.
        self.runner = GuardedRunner(app, limits=LISTENER_LIMITS, access_log=None)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        addr = self.runner.addresses[0][:2]
        log.info("metrics on http://%s:%s/metrics", *addr)
        return addr

    async def stop(self) -> None:
        await self.runner.cleanup()
