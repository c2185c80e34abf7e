"""The disk platform's HTTP API: parse, call `Platform`, render JSON. Nothing else.

Every error is mapped once, in `errors_middleware`: a `PlatformError` becomes its status
with `{"error": {"code", "message"}}`; malformed JSON or fields are 400; anything else
is logged and answered 500 without detail. Long copies (disks from sources, snapshots,
images) run as operations: 202 with an operation id, then `GET /operations/{id}` reports
progress and the result.

Every change runs as one of the platform's operations (`platform.operations`): a name
another operation is working on is refused with 409 `OperationInProgress`, naming it; an
operation past its deadline fails with 504; and one keeps running when its HTTP client
goes away (handlers await it through a shield).

Authentication: a bearer token, generated on first start as DATA_DIR/api.token (0600),
compared in constant time. Not needed for `/healthz`, `/readyz` and `/metrics`, which
say nothing of a tenant to an unauthenticated client off loopback (nbdserver/metrics.py).

Every request gets an id (`X-Request-Id` in the answer); every change (a POST, PATCH or
DELETE) is logged at INFO with its outcome, who asked and that id.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import uuid
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

from daemonkit import fips
from daemonkit.bodies import BodyError, parse
from daemonkit.httplog import escape
from daemonkit.statedb import StateUnavailable

from . import apimodels as m
from .platform.errors import BadRequest, PlatformError
from .platform.model import VolumeKind
from .platform.operations import finish
from .platform.oplog import OperationLog
from .platform.service import Platform

log = logging.getLogger("nbdserver.api")
MAX_BODY = 1 << 20
M = TypeVar("M", bound=BaseModel)


def load_api_token(data_dir: str) -> str:
    path = os.path.join(data_dir, "api.token")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(fips.random_bytes(32)).rstrip(b"=").decode())
    with open(path) as f:
        return f.read().strip()


@web.middleware
async def errors_middleware(request, handler):
    try:
        return await handler(request)
    except PlatformError as e:
        return _error(e.status, e.code, e.message)
    except StateUnavailable as e:  # the shared state's database down: retry, not a fault here
        resp = _error(503, "StateUnavailable", str(e))
        resp.headers["Retry-After"] = "1"
        return resp
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, e.reason.replace(" ", ""), e.text or e.reason)
        raise
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:
        # The client went away while its request was read: nothing of ours failed.
        log.info("%s %s: the client closed the connection mid-request", request.method, request.path)
        return _error(400, "ClientClosedRequest", "the client closed the connection mid-request")
    except Exception:
        log.exception("internal error in %s %s", request.method, request.path)
        return _error(500, "InternalError", "internal error; see the server log")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


PUBLIC = ("/healthz", "/readyz", "/metrics")  # each decides what it shows (module docstring)


def has_token(request, token: str) -> bool:
    got = request.headers.get("Authorization", "")
    return got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), token.encode())


def auth_middleware(token: str):
    @web.middleware
    async def middleware(request, handler):
        if request.path in PUBLIC:
            return await handler(request)
        if not has_token(request, token):
            request["who"] = None
            return _error(401, "Unauthorized", "missing or invalid bearer token (see DATA_DIR/api.token)")
        return await handler(request)
    return middleware


# A change's log line names its kind by the path's first segment.
_KINDS = {"disks": "disk", "encryption-sets": "encryption set", "snapshots": "snapshot",
          "images": "image"}
_ACTIONS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}


@web.middleware
async def request_log_middleware(request, handler):
    """An id for every request; one INFO line for every change, whatever its outcome.
    Who asked: the API has one credential, so "the API token" and the peer's address
    (refusals for a missing token go to DEBUG: anyone can cause those, as often as
    they like)."""
    rid = uuid.uuid4().hex
    request["request_id"] = rid
    request["who"] = "api-token"
    resp = await handler(request)
    resp.headers["X-Request-Id"] = rid
    action = _ACTIONS.get(request.method)
    if action is not None:
        parts = request.path.strip("/").split("/")
        kind = _KINDS.get(parts[0], parts[0])
        name = request.match_info.get("name") or request.get("subject") or "-"
        if len(parts) > 2:  # /images/{name}/share
            action = parts[2]
        who = request["who"] or "unauthenticated"
        peer = request.remote or "-"
        level = logging.INFO if request["who"] else logging.DEBUG
        op = resp.headers.get("Location", "").rpartition("/operations/")[2]
        log.log(level, "%s %s %s: %d %s%s (by %s from %s, request %s)", escape(kind), action,
                escape(name), resp.status, resp.reason, f", operation {op}" if op else "", who,
                peer, rid, extra={"request_id": rid, "who": who, "peer": peer, "kind": kind,
                                  "action": action, "subject": name, "status": resp.status,
                                  "operation": op or None})
    return resp


async def _body(request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"request body over {MAX_BODY} bytes") from None
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON") from None
    except RecursionError:  # a body of nested arrays deeper than the parser's stack
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    if isinstance(data.get("name"), str):
        request["subject"] = data["name"]  # for the change's log line
    return data


async def _model(request, model: type[M]) -> M:
    """The body as `model` (apimodels.py), or a 400 naming every field in question."""
    try:
        return parse(model, await _body(request))
    except BodyError as e:
        raise BadRequest(e.message) from None


def observability_routes(token: str, readiness=None, metrics=None, *,
                         token_accepted: bool = True, names_for_all: bool = False) -> dict:
    """`/healthz`, `/readyz` and `/metrics`: on the API and on `--metrics-listen`.

    `readiness()` -> (ready, report); `metrics(per_disk)` -> the exposition's response.
    Per-disk series (disk names belong to tenants) only for a caller with the API token,
    where the token is accepted: on the API listener (HTTPS off loopback), never on the
    plain-HTTP metrics listener, where it would cross the network in clear. A peer's
    loopback address proves nothing (a TLS proxy on the host is one), so only a metrics
    listener bound to loopback itself (`names_for_all`) gives names without a token."""
    async def healthz(request):
        return web.json_response(fips.health({"status": "ok"}))

    async def readyz(request):
        ready, report = readiness()
        return web.json_response(report, status=200 if ready else 503)

    async def metrics_route(request):
        return metrics(names_for_all or (token_accepted and has_token(request, token)))

    routes = {"/healthz": healthz}
    if readiness is not None:
        routes["/readyz"] = readyz
    if metrics is not None:
        routes["/metrics"] = metrics_route
    return routes


def build_app(platform: Platform, token: str, *, nbd_address: str | None = None,
              readiness=None, metrics=None) -> web.Application:
    app = web.Application(middlewares=[request_log_middleware, errors_middleware,
                                       auth_middleware(token)],
                          client_max_size=MAX_BODY)
    ops: OperationLog = platform.oplog  # the platform starts some itself (key rotation)
    r = web.RouteTableDef()
    J = web.json_response

    def accepted(op):
        return J(op, status=202, headers={"Location": f"/operations/{op['id']}"})

    def size_of(kind: VolumeKind, name) -> int | None:
        """The bytes an operation copies, for clients' progress (None: not known yet)."""
        try:
            return platform.volume(kind, name).size
        except PlatformError:
            return None

    for path, handler in observability_routes(token, readiness, metrics).items():
        r.get(path)(handler)

    @r.get("/status")
    async def status(request):
        """`nbdserver status`: the readiness report, for the token holder, with addresses."""
        ready, report = readiness() if readiness is not None else (True, {"status": "ready"})
        return J({**report, "ready": ready, "nbd": nbd_address,
                  "keyServiceUrl": platform.keyservice_url})

    @r.get("/info")
    async def info(request):
        """Where clients reach the disks: attach commands read the NBD address here."""
        return J({"nbd": nbd_address, "keyServiceUrl": platform.keyservice_url})

    @r.get("/operations")
    async def list_ops(request):
        """Long operations, running first, then newest first (kept across restarts), and
        what the platform is working on right now."""
        return J({"value": ops.list(), "inProgress": platform.operations.views()})

    @r.get("/operations/{id}")
    async def get_op(request):
        return J(ops.view(request.match_info["id"]))

    # encryption sets
    @r.post("/encryption-sets")
    async def des_create(request):
        b = await _model(request, m.EncryptionSetCreate)
        return J(await finish(platform.create_des(
            b.name, b.keyUrl, subscription=b.subscription, location=b.location,
            allow_cross_subscription=bool(b.allowCrossSubscription),
            auto_rotate=bool(b.rotationToLatestKeyVersionEnabled),
            encryption_type=b.encryptionType)), status=201)

    @r.get("/encryption-sets")
    async def des_list(request):
        return J({"value": platform.list_des()})

    @r.get("/encryption-sets/{name}")
    async def des_show(request):
        return J(await platform.show_des(request.match_info["name"]))

    @r.patch("/encryption-sets/{name}")
    async def des_update(request):
        b = await _model(request, m.EncryptionSetUpdate)
        return J(await finish(platform.update_des(
            request.match_info["name"], b.keyUrl, auto_rotate=b.rotationToLatestKeyVersionEnabled)))

    @r.delete("/encryption-sets/{name}")
    async def des_delete(request):
        await finish(platform.delete_des(request.match_info["name"]))
        return web.Response(status=204)

    # disks
    @r.post("/disks")
    async def disk_create(request):
        b = await _model(request, m.DiskCreate)
        name = b.name
        kw = dict(size=b.size, des=b.diskEncryptionSet, source=b.source, count=b.count,
                  subscription=b.subscription, location=b.location, cache=b.cache, storage=b.storage)
        src_kind, _, src_name = (kw["source"] or "").partition(":")
        copied = size_of(VolumeKind(src_kind), src_name) if src_kind in ("snapshot", "image") else None
        # Validated and its names claimed before answering 202.
        return accepted(ops.start("disk.create", f"disk:{name}", lambda progress: platform.create_disks(
            name, progress=progress, **kw), copied and copied * (kw["count"] or 1)))

    @r.get("/disks")
    async def disk_list(request):
        return J({"value": platform.list_volumes(VolumeKind.DISK)})

    @r.get("/disks/{name}")
    async def disk_show(request):
        return J(platform.show_disk(request.match_info["name"]))

    @r.get("/disks/{name}/key-envelope")
    async def disk_envelope(request):
        return J(platform.key_envelope(request.match_info["name"]))

    @r.get("/disks/{name}/usage")
    async def disk_usage(request):
        return J(platform.disk_usage(request.match_info["name"]))

    @r.patch("/disks/{name}")
    async def disk_update(request):
        b = await _model(request, m.DiskUpdate)
        if b.size is not None:  # a resize: the key is changed by a request of its own
            if b.diskEncryptionSet is not None or b.platformKey:
                raise BadRequest("change a disk's size and its key in two requests")
            return J(await finish(platform.resize_disk(request.match_info["name"], b.size)))
        return J(await finish(platform.update_disk(
            request.match_info["name"], des=b.diskEncryptionSet, platform_key=bool(b.platformKey))))

    @r.delete("/disks/{name}")
    async def disk_delete(request):
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        await finish(platform.delete_disk(request.match_info["name"], force=force))
        return web.Response(status=204)

    # snapshots and images
    @r.post("/snapshots")
    async def snap_create(request):
        b = await _model(request, m.SnapshotCreate)
        name, disk = b.name, b.disk
        return accepted(ops.start("snapshot.create", f"snapshot:{name}", lambda progress:
                                  platform.create_snapshot(name, disk, progress),
                                  size_of(VolumeKind.DISK, disk)))

    @r.post("/images")
    async def image_create(request):
        b = await _model(request, m.ImageCreate)
        name, source = b.name, b.source
        src_kind, _, src_name = source.partition(":")
        copied = size_of(VolumeKind(src_kind), src_name) if src_kind in ("disk", "snapshot") else None
        return accepted(ops.start("image.create", f"image:{name}", lambda progress:
                                  platform.create_image(name, source, progress), copied))

    @r.post("/images/{name}/share")
    async def image_share(request):
        b = await _model(request, m.ImageShare)
        return J(await finish(platform.share_image(request.match_info["name"], b.gallery)))

    for kind in (VolumeKind.SNAPSHOT, VolumeKind.IMAGE):
        base = f"/{kind.value}s"

        async def vlist(request, kind=kind):
            return J({"value": platform.list_volumes(kind)})

        async def vshow(request, kind=kind):
            return J(platform.show_volume(kind, request.match_info["name"]))

        async def vdelete(request, kind=kind):
            await finish(platform.delete_volume(kind, request.match_info["name"]))
            return web.Response(status=204)

        r.get(base)(vlist)
        r.get(base + "/{name}")(vshow)
        r.delete(base + "/{name}")(vdelete)

    app.add_routes(r)
    return app
