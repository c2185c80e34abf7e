"""The audit log: read a chain, verify a chain."""
from aiohttp import web

from .body import query_int


async def show(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    entries = await domain.run(domain.service.audit_entries, request["caller"],
                               request.match_info.get("vault"),
                               query_int(request, "limit", 1000, 1, 10000),
                               query_int(request, "after", 0))
    return web.json_response({"value": entries})


async def verify(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    result = await domain.run(domain.service.verify_audit, request["caller"],
                              request.match_info.get("vault"))
    return web.json_response(result.to_dict())


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/vaults/{vault}/audit", show, name="AuditShow")
    router.add_get("/vaults/{vault}/audit/verify", verify, name="AuditVerify")
    router.add_get("/audit", show, name="ServiceAuditShow")
    router.add_get("/audit/verify", verify, name="ServiceAuditVerify")
