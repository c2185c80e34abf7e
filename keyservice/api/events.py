"""The change stream: server-sent events (WHATWG HTML, "Server-sent events").

Each event is `id: <seq>`, `event: <type>`, `data: <json>`. A comment line
(`: keepalive`) goes out every heartbeat interval while nothing happens, so a
subscriber notices a dead connection within a few seconds. Resume with
`?since=<seq>` or the standard `Last-Event-ID` header; without either, the
stream starts at the present (no history).
"""
import asyncio
import json

from aiohttp import web

from ..domain.errors import BadRequest
from .body import query_int

BATCH = 500


async def stream(request: web.Request) -> web.StreamResponse:
    domain, bus = request.app["domain"], request.app["bus"]
    svc = domain.service
    svc.check_subscriber(request["caller"])
    since = query_int(request, "since", None)
    if since is None and "Last-Event-ID" in request.headers:
        try:
            since = int(request.headers["Last-Event-ID"])
        except ValueError:
            raise BadRequest("Last-Event-ID must be an integer") from None
    if since is None:
        since = await domain.run(svc.last_event_seq)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                       "x-ms-request-id": request["request_id"]})
    await resp.prepare(request)
    await resp.write(b"retry: 1000\n: connected\n\n")
    tally = request.app["tally"]
    tally.subscribers += 1
    try:
        await _follow(resp, domain, bus, request["caller"], since, request.app["heartbeat"])
    except (ConnectionResetError, ConnectionError):
        pass  # the subscriber went away: that is how streams end
    finally:
        tally.subscribers -= 1
    return resp


async def _follow(resp, domain, bus, caller, since: int, heartbeat: float) -> None:
    svc = domain.service
    while not bus.closed:
        wake = bus.waiter()  # before reading, so a commit in between still wakes us
        events = await domain.run(svc.events_after, caller, since, BATCH)
        for e in events:
            since = e.seq
            await resp.write(f"id: {e.seq}\nevent: {e.type}\ndata: "
                             f"{json.dumps(e.to_dict())}\n\n".encode())
        if len(events) == BATCH:
            continue
        try:
            await asyncio.wait_for(wake.wait(), heartbeat)
        except TimeoutError:
            await resp.write(b": keepalive\n\n")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/events", stream, name="Events")
