"""The audit log: read a chain, verify a chain. `/audit?vaultId=ID` is a vault's chain by
the vault's id, the only way to a purged vault's closed chain (home-tenant admins)."""
import uuid

from aiohttp import web

from daemonkit.rfc3339 import parse_time

from ..domain.errors import BadRequest
from .body import query_int


async def show(request: web.Request) -> web.Response:
    """`limit` entries after seq `after`, oldest first; `tail=N`: the last N instead;
    `since=TIME` (RFC 3339): only entries at or after it."""
    domain = request.app["domain"]
    if "tail" in request.query and "limit" in request.query:
        raise BadRequest("give 'tail' (the last N entries) or 'limit' (the first N), not both")
    tail = "tail" in request.query
    limit = query_int(request, "tail", 100, 1, 10000) if tail else query_int(request, "limit", 1000, 1, 10000)
    entries = await domain.run(domain.service.audit_entries, request["caller"],
                               request.match_info.get("vault"), limit, query_int(request, "after", 0),
                               _vault_id(request), newest=tail, since=_since(request))
    return web.json_response({"value": entries})


def _since(request: web.Request) -> float | None:
    value = request.query.get("since")
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as e:
        raise BadRequest(f"query parameter 'since': {e}") from None


async def verify(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    result = await domain.run(domain.service.verify_audit, request["caller"],
                              request.match_info.get("vault"), _vault_id(request))
    return web.json_response(result.to_dict())


def _vault_id(request: web.Request) -> str | None:
    if "vault" in request.match_info:
        return None
    value = request.query.get("vaultId") or None
    if value is not None:
        try:
            value = str(uuid.UUID(value))
        except ValueError:
            raise BadRequest("query parameter 'vaultId' must be a vault id (a UUID)") from None
    return value


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/vaults/{vault}/audit", show, name="AuditShow")
    router.add_get("/vaults/{vault}/audit/verify", verify, name="AuditVerify")
    router.add_get("/audit", show, name="ServiceAuditShow")
    router.add_get("/audit/verify", verify, name="ServiceAuditVerify")
