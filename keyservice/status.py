"""`keyservice status`: is the service ready, and if not, why (as `vault status` answers).

Reads the unauthenticated `/readyz` (keyservice/api/health.py), so it needs no
credential: an operator can ask before having one. Unreachable is exit 3, like every
command; not ready is exit 1, after the report.
"""
from __future__ import annotations

import aiohttp

from .client import unreachable


async def readiness(url: str, *, ssl=None, timeout: float = 10.0) -> dict:
    base = url.rstrip("/")
    limits = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout, sock_read=timeout)
    try:
        async with aiohttp.ClientSession(timeout=limits) as session:
            async with session.get(base + "/readyz", ssl=ssl) as resp:
                body = await resp.json(content_type=None)
                ready = resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise unreachable(base, e) from e
    return {"url": base, "ready": ready, **(body if isinstance(body, dict) else {})}
