"""The aiohttp application: routes, the one error-mapping middleware, audit.

Every domain call runs on a single worker thread (`Domain.run`): the SQLite
connection is used by one thread only, transactions are serialised, and nothing
there blocks the event loop, so the change stream and heartbeats keep flowing.
That thread does only short work (lookups, checks, commits): key generation and
import parsing run on `Domain.work` (`work.py`) between an authorization and a commit,
and wrap/unwrap's RSA operation on `Domain.compute` after its authorization, so
revocation never waits behind them. Audit entries are group-committed
(`audit_writer.py`): calls that end together share one transaction.
"""
import asyncio
import functools
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from daemonkit.httplog import escape
from daemonkit.statedb import StateUnavailable

from ..domain import errors
from .addressing import Addressing, is_host_form
from .audit_writer import AuditWriter
from .body import MAX_BODY
from .refusals import RefusalTally, cap
from .work import ExpensiveWork, WorkLimits

log = logging.getLogger("keyservice")

STATUS = {errors.BadRequest: 400, errors.Unauthorized: 401, errors.Forbidden: 403,
          errors.NotFound: 404, errors.Conflict: 409, errors.TooManyRequests: 429}
# route names callable without a bearer token
PUBLIC = {"Token", "TokenV2", "OpenIdConfiguration", "OpenIdKeys", "OpenApi", "Health"}
UNAUDITED = {"OpenApi", "Health", "OpenIdConfiguration", "OpenIdKeys"}
TOKEN_ROUTES = {"Token", "TokenV2"}  # their 401s are OAuth's, not a resource's challenge
# The probes and the scraper's route (health.py, metrics.py): no token, no audit entry.
PUBLIC |= {"Liveness", "Readiness", "Metrics"}
UNAUDITED |= {"Liveness", "Readiness", "Metrics"}


class EventBus:
    """Wakes change-stream subscribers after a commit. Subscribers take the
    current waiter *before* reading the store, so no wake-up is lost."""

    def __init__(self):
        self._event = asyncio.Event()
        self.closed = False

    def waiter(self) -> asyncio.Event:
        return self._event

    def publish(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def close(self) -> None:
        self.closed = True
        self.publish()


class Domain:
    """The service plus the thread it runs on, and the audit writer that commits on it."""

    def __init__(self, service, limits: WorkLimits | None = None):
        self.service = service
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keyservice-domain")
        self.work = ExpensiveWork(limits or WorkLimits())
        # RSA private-key operations of wrap/unwrap (under a millisecond each for 2048
        # bits): OpenSSL runs them without the GIL, so one thread per core runs them in
        # parallel with the domain thread and the event loop. No admission: each call
        # was authorized first and costs about what its HTTP exchange costs.
        self._crypto = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                          thread_name_prefix="keyservice-rsa")
        self.audit = AuditWriter(lambda entries: self.run(service.record_many, entries))

    async def run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs))

    async def compute(self, fn, *args):
        """A pure computation (no store, no domain state) off the domain thread."""
        return await asyncio.get_running_loop().run_in_executor(self._crypto, fn, *args)

    def shutdown(self) -> None:
        self.work.shutdown()
        self._crypto.shutdown(wait=True)
        self._executor.shutdown(wait=True)


def error_body(code: str, message: str, inner: str | None = None) -> dict:
    err: dict[str, object] = {"code": code, "message": message}
    if inner:
        err["innererror"] = {"code": inner}
    return {"error": err}


def _error_response(status: int, code: str, message: str, inner=None) -> web.Response:
    return web.json_response(error_body(code, message, inner), status=status)


# Key Vault's data-plane versions from 7.4 on: "7.N" (and its previews) and the dated
# ones that followed 7.6 ("2025-07-01"). Clients that send none (this project's own)
# get the current behaviour; the shapes served are those of 7.4 and later.
_API_VERSION = re.compile(r"7\.(\d{1,3})(-preview(\.\d{1,3})?)?|(20\d\d-\d\d-\d\d)(-preview)?")


def check_api_version(value: str | None) -> None:
    if value is None:
        return
    m = _API_VERSION.fullmatch(value)
    if not m or (m[1] is not None and int(m[1]) < 4) or (m[4] is not None and m[4] < "2025-01-01"):
        raise errors.BadRequest(f"The specified version ({value[:32]}) is not recognized. "
                                "Supported: 7.4, 7.5, 7.6 and 2025-07-01 or later")


async def _challenge(request: web.Request, resp: web.Response) -> None:
    """Key Vault's challenge (what the SDKs' challenge policy parses): where to get a
    token (`authorization`: the token service and the tenant) and for what (`resource`)."""
    domain: Domain = request.app["domain"]
    addressing: Addressing = request.app["addressing"]
    vault = request.match_info.get("vault") or request.get("host_vault")
    try:
        tenant = await domain.run(domain.service.challenge_tenant, vault)
    except Exception:  # never worse than a challenge without the vault's tenant
        tenant = domain.service.home_tenant
    resp.headers["WWW-Authenticate"] = (f'Bearer authorization="{addressing.authority}/{tenant}", '
                                        f'resource="{addressing.resource}"')


_HTTP_CODES = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestEntityTooLarge"}


@web.middleware
async def edge(request: web.Request, handler):
    """Authenticate, call, map errors to statuses (the only place that does),
    audit the call and log one line. Never lets a traceback reach a client."""
    domain: Domain = request.app["domain"]
    rid = str(uuid.uuid4())
    started = time.monotonic()
    request["request_id"] = rid
    request["caller"] = None
    request["host_vault"] = request.app["addressing"].vault_of_host(request.host)
    name = (request.match_info.route.name or "Unknown").removesuffix(".host")
    error_code = None
    try:
        check_api_version(request.query.get("api-version"))
        if is_host_form(request):
            if request["host_vault"] is None:
                raise errors.NotFound(f"'{request.host}' names no vault: use "
                                      "https://{vault}.{domain}/keys (serve --vault-domain) or "
                                      "/vaults/{vault}/keys", code="VaultNotFound")
            request["vault"] = request["host_vault"]  # for the audit chain
        if name not in PUBLIC and request.match_info.http_exception is None:
            request["caller"] = await domain.run(domain.service.authenticate, _bearer(request))
        resp = await handler(request)
    except errors.DomainError as e:
        error_code = e.code
        status = next(s for cls, s in STATUS.items() if isinstance(e, cls))
        resp = _error_response(status, e.code, e.message, e.inner)
        if isinstance(e, errors.TooManyRequests):
            resp.headers["Retry-After"] = str(e.retry_after)
    except StateUnavailable as e:  # the shared state's database down: retry, not a fault here
        error_code = "StateUnavailable"
        resp = _error_response(503, error_code, str(e))
        resp.headers["Retry-After"] = "1"
    except web.HTTPException as e:
        status = e.status
        error_code = _HTTP_CODES.get(status, "BadRequest")
        message = {413: f"The request body is larger than the limit of {MAX_BODY} bytes",
                   404: f"No such operation: {request.method} {request.path}",
                   405: f"Method {request.method} is not allowed on {request.path}"}.get(status, e.reason)
        resp = _error_response(status, error_code, message)
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:
        # The client went away while its request was read (killed, or cut off by
        # httpguard): not a fault of ours, so no traceback. Nobody reads this answer;
        # the code is for the audit entry and the log line.
        error_code = "ClientClosedRequest"
        resp = _error_response(400, error_code, "The client closed the connection mid-request")
    except Exception:
        log.exception("request %s failed", rid)
        error_code = "InternalError"
        resp = _error_response(500, "InternalError", f"Internal error; request id {rid}")
    error_code = error_code or request.get("error_code")
    if not resp.prepared:
        resp.headers["x-ms-request-id"] = rid
        if resp.status == 401 and name not in TOKEN_ROUTES:
            await _challenge(request, resp)
    caller = request["caller"].object_id if request["caller"] else request.get("caller_hint")
    if name in UNAUDITED:
        pass
    elif caller is None and resp.status >= 400:
        request.app["refusals"].count(name, resp.status, error_code)  # see refusals.py
    else:
        entry = {"time": time.time(), "requestId": rid, "caller": caller, "operation": name,
                 "vault": request.match_info.get("vault") or request.get("vault"),
                 "key": request.match_info.get("name"),
                 "kid": request.get("kid"), "objectId": request.match_info.get("object_id"),
                 "vaultId": request.get("vault_id"),
                 "status": resp.status, "error": error_code}
        await _record(domain, {k: cap(v) for k, v in entry.items() if v is not None})
    request.app["tally"].record(name, error_code, started)
    log.info("%s %s %s %s %d%s", rid, escape(caller or "-"), escape(request.method),
             escape(request.path), resp.status, f" {error_code}" if error_code else "",
             extra={"request_id": rid, "caller": caller, "operation": name, "status": resp.status})
    return resp


async def _record(domain: Domain, entry: dict) -> None:
    """Return once the entry is committed, so the call is answered after its record is
    durable; a failed append is logged by the writer, and the call is answered anyway."""
    try:
        await domain.audit.record(entry)
    except Exception:
        pass


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("A bearer token is required (Authorization: Bearer <token>)")
    return token.strip()


def make_app(service, *, heartbeat: float = 5.0, limits: WorkLimits | None = None,
             vault_domain: str | None = None) -> web.Application:
    from . import audit, directory, events, health, keys, metrics, oauth, vaults
    app = web.Application(client_max_size=MAX_BODY, middlewares=[edge])
    app["domain"] = Domain(service, limits)
    app["addressing"] = Addressing(getattr(service, "base_url", "http://127.0.0.1"), vault_domain)
    app["bus"] = EventBus()
    app["heartbeat"] = heartbeat
    app["refusals"] = RefusalTally(lambda entry: _record(app["domain"], entry))
    app["tally"] = metrics.ApiTally()
    for module in (directory, vaults, keys, audit, events, oauth, health, metrics):
        module.add_routes(app.router)

    async def on_startup(app):
        loop = asyncio.get_running_loop()
        service.notify = lambda seq: loop.call_soon_threadsafe(app["bus"].publish)

    async def on_shutdown(app):
        app["bus"].close()  # ends open change streams so shutdown does not wait on them

    async def on_cleanup(app):
        await app["refusals"].close()
        await app["domain"].audit.close()
        app["domain"].shutdown()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
