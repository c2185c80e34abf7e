"""Probes: `/healthz` (the process answers) and `/readyz` (it can serve), no token.

Ready: not shutting down, and the domain thread answers a read of the store within
READY_TIMEOUT (every call goes through that one thread: if it is stuck, nothing
works, though the event loop still answers `/healthz`). `/health`, the older
liveness route, stays as it was.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from daemonkit import fips

READY_TIMEOUT = 2.0  # seconds; a store read takes microseconds when nothing is wrong


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(fips.health({"status": "ok"}))


async def readyz(request: web.Request) -> web.Response:
    domain, problems = request.app["domain"], []
    chains = entries = None
    if request.app["bus"].closed:
        problems.append("shutting down")
    else:
        try:
            chains, entries = await asyncio.wait_for(domain.run(domain.service.store.audit_totals),
                                                     READY_TIMEOUT)
        except TimeoutError:
            problems.append(f"the store did not answer within {READY_TIMEOUT:g}s")
        except Exception as e:  # a store that fails is the answer here, not a 500
            problems.append(f"the store failed: {type(e).__name__}")
    ready = not problems
    return web.json_response({"status": "ready" if ready else "not ready", "problems": problems,
                              "auditChains": chains, "auditEntries": entries,
                              "eventSubscribers": request.app["tally"].subscribers},
                             status=200 if ready else 503)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/healthz", healthz, name="Liveness")
    router.add_get("/readyz", readyz, name="Readiness")
