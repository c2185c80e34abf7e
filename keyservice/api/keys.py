"""Key operations, in Key Vault's paths and field names."""
from aiohttp import web

from ..domain import rsakeys
from ..domain.errors import BadRequest
from ..domain.keys import parse_attributes
from . import render, work
from .body import field, json_body


def _args(request):
    m = request.match_info
    return request.app["domain"], request.app["domain"].service, request["caller"], m["vault"], m["name"]


async def create(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    body = await json_body(request)
    kty = field(body, "kty", str, default="RSA")
    if kty not in ("RSA", "RSA-HSM"):
        raise BadRequest(f"Unsupported key type {kty!r}; only RSA keys are supported")
    size = rsakeys.check_size(field(body, "key_size", int, default=rsakeys.DEFAULT_SIZE))
    attrs = parse_attributes(field(body, "attributes", dict), field(body, "key_ops", list))
    return await _new_version(request, "create", lambda _: rsakeys.generate(size), attrs, size)


async def import_(request: web.Request) -> web.Response:
    body = await json_body(request)
    attrs = parse_attributes(field(body, "attributes", dict), None)
    if "pem" in body:  # an extension to Key Vault's JWK-only import, for `key import --pem`
        pem = field(body, "pem", str, required=True).encode()
        return await _new_version(request, "import", lambda _: rsakeys.load_pem(pem), attrs)
    jwk = field(body, "key", dict, required=True)
    return await _new_version(request, "import", lambda _: rsakeys.load_jwk(jwk), attrs)


async def _new_version(request, permission: str, make, attrs=None, size=None) -> web.Response:
    """Authorize on the domain thread, make the key on the work pool (admission-limited
    per caller; `make(current size or None)`), commit on the domain thread, which checks
    everything again."""
    domain, svc, caller, vault, name = _args(request)
    current = await domain.run(svc.authorize_version, caller, vault, name, permission)
    private = await domain.work.run(caller.object_id, permission, work.cost(size or current),
                                    make, current)
    v, key, kv = await domain.run(svc.add_version, caller, vault, name, permission, private, attrs)
    return _bundle(request, svc, v, key, kv)


async def get(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key, kv = await domain.run(svc.get_key, caller, vault, name, request.match_info.get("version"))
    return _bundle(request, svc, v, key, kv)


async def update(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    body = await json_body(request)
    attrs = parse_attributes(field(body, "attributes", dict), field(body, "key_ops", list))
    v, key, kv = await domain.run(svc.update_key, caller, vault, name,
                                  request.match_info.get("version"), attrs)
    return _bundle(request, svc, v, key, kv)


async def rotate(request: web.Request) -> web.Response:
    return await _new_version(request, "rotate", rsakeys.generate)  # the current size


async def list_(request: web.Request) -> web.Response:
    domain, svc, caller = request.app["domain"], request.app["domain"].service, request["caller"]
    deleted = request.match_info.route.name == "DeletedKeyList"
    v, keys = await domain.run(svc.list_keys, caller, request.match_info["vault"], deleted)
    return web.json_response({"value": [render.key_item(svc, v, k, deleted) for k in keys],
                              "nextLink": None})


async def versions(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key = await domain.run(svc.list_versions, caller, vault, name)
    return web.json_response({"value": [render.version_item(svc, v, key, kv) for kv in key.versions],
                              "nextLink": None})


async def _crypto(request: web.Request, op) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    body = await json_body(request)
    alg = field(body, "alg", str, default=rsakeys.DEFAULT_ALG)
    value = rsakeys.b64u_decode(field(body, "value", str, required=True))
    kid, out = await domain.run(op(svc), caller, vault, name, request.match_info.get("version"),
                                alg, value)
    request["kid"] = kid
    return web.json_response({"kid": kid, "value": rsakeys.b64u_encode(out)})


async def wrap(request: web.Request) -> web.Response:
    return await _crypto(request, lambda svc: svc.wrap)


async def unwrap(request: web.Request) -> web.Response:
    return await _crypto(request, lambda svc: svc.unwrap)


async def delete(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key = await domain.run(svc.delete_key, caller, vault, name)
    return web.json_response(render.deleted_key_bundle(svc, v, key))


async def get_deleted(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key = await domain.run(svc.get_deleted_key, caller, vault, name)
    return web.json_response(render.deleted_key_bundle(svc, v, key))


async def recover(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key, kv = await domain.run(svc.recover_key, caller, vault, name)
    return _bundle(request, svc, v, key, kv)


async def purge(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    await domain.run(svc.purge_key, caller, vault, name)
    return web.Response(status=204)


def _bundle(request, svc, v, key, kv) -> web.Response:
    bundle = render.key_bundle(svc, v, key, kv)
    request["kid"] = bundle["key"]["kid"]
    return web.json_response(bundle)


def add_routes(router: web.UrlDispatcher) -> None:
    base = "/vaults/{vault}/keys"
    router.add_get(base, list_, name="KeyList")
    # Literal segments before {version}, so "versions" is never read as a version.
    router.add_get(base + "/{name}/versions", versions, name="KeyVersions")
    router.add_post(base + "/{name}/create", create, name="KeyCreate")
    router.add_post(base + "/{name}/rotate", rotate, name="KeyRotate")
    router.add_post(base + "/{name}/wrapkey", wrap, name="KeyWrap")
    router.add_post(base + "/{name}/unwrapkey", unwrap, name="KeyUnwrap")
    router.add_put(base + "/{name}", import_, name="KeyImport")
    router.add_get(base + "/{name}", get, name="KeyGet")
    router.add_patch(base + "/{name}", update, name="KeyUpdate")
    router.add_delete(base + "/{name}", delete, name="KeyDelete")
    router.add_get(base + "/{name}/{version}", get, name="KeyGetVersion")
    router.add_patch(base + "/{name}/{version}", update, name="KeyUpdateVersion")
    router.add_post(base + "/{name}/{version}/wrapkey", wrap, name="KeyWrapVersion")
    router.add_post(base + "/{name}/{version}/unwrapkey", unwrap, name="KeyUnwrapVersion")
    deleted = "/vaults/{vault}/deletedkeys"
    router.add_get(deleted, list_, name="DeletedKeyList")
    router.add_get(deleted + "/{name}", get_deleted, name="DeletedKeyGet")
    router.add_post(deleted + "/{name}/recover", recover, name="KeyRecover")
    router.add_delete(deleted + "/{name}", purge, name="KeyPurge")
