"""Key operations, in Key Vault's paths and field names.

Every route exists twice: in path form under /vaults/{vault} and in host form (the
vault in the Host header, api/addressing.py). Version-less calls also come with a
trailing slash (`GET /keys/k1/`, `PATCH /keys/k1/`): that is how the Azure SDKs send
an empty version.
"""
from aiohttp import web

from ..domain import hsm_keys, rsakeys
from ..domain.errors import BadRequest
from ..domain.keys import IMPORT_OP, parse_attributes
from . import models, render, work
from .addressing import vault_name, vault_url
from .body import model_body
from .paging import page


def _attributes(body: models.KeyCreate | models.KeyUpdate | models.KeyImport) -> dict | None:
    """The attributes given, for the domain's rules. What Key Vault's bodies carry and this
    service does not keep (tags, a release policy, an exportable key) is refused: dropping
    it would let the caller believe it holds. `exportable: false` is what every bundle here
    says, so a client that sends the attributes it read back gets it accepted."""
    if body.tags:
        raise BadRequest("Key tags are not supported by this service")
    if body.release_policy is not None:
        raise BadRequest("Key release policies are not supported: no private key ever leaves "
                         "this service")
    attrs = body.attributes
    if attrs is None:
        return None
    if "exportable" in attrs.model_fields_set and attrs.exportable is not False:
        raise BadRequest("attributes.exportable must be false: no private key ever leaves "
                         "this service")
    return attrs.model_dump(exclude_unset=True, exclude={"exportable"})


def _args(request):
    return (request.app["domain"], request.app["domain"].service, request["caller"],
            vault_name(request), request.match_info["name"])


async def create(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    body = await model_body(request, models.KeyCreate)
    given = _attributes(body)
    kty = hsm_keys.check_kty(hsm_keys.KTY_SOFTWARE if body.kty is None else body.kty)
    size = rsakeys.check_size(rsakeys.DEFAULT_SIZE if body.key_size is None else body.key_size)
    attrs = parse_attributes(given, body.key_ops)
    if kty == hsm_keys.KTY_HSM:
        hsm_keys.require_token(svc.hsm)  # refused before any work
    kek = attrs.key_ops is not None and IMPORT_OP in attrs.key_ops  # BYOK's key-exchange key
    return await _new_version(request, "create", lambda _: svc.generate_key(kty, size, kek), attrs,
                              size)


async def import_(request: web.Request) -> web.Response:
    body = await model_body(request, models.KeyImport)
    attrs = parse_attributes(_attributes(body), None)
    jwk = None if body.key is None else body.key.model_dump(exclude_unset=True)
    if jwk is not None and "key_hsm" in jwk:  # BYOK (hsm_keys.py)
        kek_kid, ciphertext = hsm_keys.parse_transfer_blob(jwk)
        domain, svc, caller, vault, _ = _args(request)
        kek_id, kek_size = await domain.run(svc.authorize_byok, caller, vault, kek_kid)
        return await _new_version(request, "import", lambda _: hsm_keys.require_token(svc.hsm)
                                  .import_transfer_blob(kek_id, kek_size, ciphertext), attrs)
    # Key Vault's KeyImportParameters spell it "Hsm" (the SDKs' hardware_protected); "hsm" is
    # what this service's own client sent first.
    if body.Hsm or body.hsm or (jwk is not None and jwk.get("kty") == hsm_keys.KTY_HSM):
        # A key that was ever in the clear is not an HSM key: RSA-HSM keys are made in the token.
        raise BadRequest("A plaintext key cannot be imported as RSA-HSM; import it as RSA, or "
                         "create an RSA-HSM key (kty RSA-HSM) in the HSM")
    if body.pem is not None:  # an extension to Key Vault's JWK-only import, for `key import --pem`
        pem = body.pem.encode()
        return await _new_version(request, "import", lambda _: rsakeys.load_pem(pem), attrs)
    if jwk is None:
        raise BadRequest("'key' (a JSON web key) is required, or 'pem' (this service's extension)")
    private = jwk
    return await _new_version(request, "import", lambda _: rsakeys.load_jwk(private), attrs)


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
    body = await model_body(request, models.KeyUpdate)
    attrs = parse_attributes(_attributes(body), body.key_ops)
    v, key, kv = await domain.run(svc.update_key, caller, vault, name,
                                  request.match_info.get("version"), attrs)
    return _bundle(request, svc, v, key, kv)


async def rotate(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    kty, kek = await domain.run(svc.current_kty, caller, vault, name)
    return await _new_version(request, "rotate", lambda size: svc.generate_key(kty, size, kek))


async def list_(request: web.Request) -> web.Response:
    domain, svc, caller = request.app["domain"], request.app["domain"].service, request["caller"]
    deleted = (request.match_info.route.name or "").startswith("DeletedKeyList")
    vault = vault_name(request)
    v, keys = await domain.run(svc.list_keys, caller, vault, deleted)
    url = vault_url(request, vault)
    p = page(request, url + ("/deletedkeys" if deleted else "/keys"), keys, lambda k: k.name)
    return web.json_response({"value": [render.key_item(url, v, k, deleted) for k in p["chosen"]],
                              "nextLink": p["nextLink"]})


async def versions(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key = await domain.run(svc.list_versions, caller, vault, name)
    url = vault_url(request, vault)
    p = page(request, f"{url}/keys/{name}/versions", list(enumerate(key.versions)), lambda i: i[0])
    return web.json_response({"value": [render.version_item(url, v, key, kv) for _, kv in p["chosen"]],
                              "nextLink": p["nextLink"]})


async def _crypto(request: web.Request, op) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    body = await model_body(request, models.KeyOperation)
    alg = rsakeys.DEFAULT_ALG if body.alg is None else body.alg
    value = rsakeys.b64u_decode(body.value)
    kid, rsa_op = await domain.run(op(svc), caller, vault, name, request.match_info.get("version"),
                                   alg)
    out = await domain.compute(rsa_op, value)  # off the domain thread (key_ops.py)
    # The domain names the version in its own (path-form) kid; answer in the request's form.
    kid = render.kid(vault_url(request, vault), name, kid.rsplit("/", 1)[1])
    request["kid"] = kid
    return web.json_response({"kid": kid, "value": rsakeys.b64u_encode(out)})


async def wrap(request: web.Request) -> web.Response:
    return await _crypto(request, lambda svc: svc.authorize_wrap)


async def unwrap(request: web.Request) -> web.Response:
    return await _crypto(request, lambda svc: svc.authorize_unwrap)


async def delete(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key = await domain.run(svc.delete_key, caller, vault, name)
    return web.json_response(render.deleted_key_bundle(vault_url(request, vault), v, key))


async def get_deleted(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key = await domain.run(svc.get_deleted_key, caller, vault, name)
    return web.json_response(render.deleted_key_bundle(vault_url(request, vault), v, key))


async def recover(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    v, key, kv = await domain.run(svc.recover_key, caller, vault, name)
    return _bundle(request, svc, v, key, kv)


async def backup(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    blob = await domain.run(svc.backup_key, caller, vault, name)
    return web.json_response({"value": rsakeys.b64u_encode(blob)})


async def restore(request: web.Request) -> web.Response:
    """The key's name comes from the blob, not the path (Key Vault's restore)."""
    domain, svc, caller = request.app["domain"], request.app["domain"].service, request["caller"]
    body = await model_body(request, models.KeyRestore)
    blob = rsakeys.b64u_decode(body.value)
    v, key, kv = await domain.run(svc.restore_key, caller, vault_name(request), blob)
    return _bundle(request, svc, v, key, kv)


async def purge(request: web.Request) -> web.Response:
    domain, svc, caller, vault, name = _args(request)
    await domain.run(svc.purge_key, caller, vault, name)
    return web.Response(status=204)


def _bundle(request, svc, v, key, kv) -> web.Response:
    bundle = render.key_bundle(vault_url(request, v.name), v, key, kv)
    request["kid"] = bundle["key"]["kid"]
    return web.json_response(bundle)


def add_routes(router: web.UrlDispatcher) -> None:
    _add_key_routes(router, "/vaults/{vault}", "")
    _add_key_routes(router, "", ".host")  # the vault from the Host header


def _add_key_routes(router: web.UrlDispatcher, vault: str, suffix: str) -> None:
    base = vault + "/keys"
    # Literal segments before {version}, so "versions" is never read as a version.
    routes = [
        ("GET", base, list_, "KeyList"),
        ("POST", base + "/restore", restore, "KeyRestore"),  # before /{name}: a literal segment
        ("POST", base + "/{name}/backup", backup, "KeyBackup"),
        ("GET", base + "/{name}/versions", versions, "KeyVersions"),
        ("POST", base + "/{name}/create", create, "KeyCreate"),
        ("POST", base + "/{name}/rotate", rotate, "KeyRotate"),
        ("POST", base + "/{name}/wrapkey", wrap, "KeyWrap"),
        ("POST", base + "/{name}/unwrapkey", unwrap, "KeyUnwrap"),
        ("PUT", base + "/{name}", import_, "KeyImport"),
        ("GET", base + "/{name}", get, "KeyGet"),
        ("PATCH", base + "/{name}", update, "KeyUpdate"),
        ("DELETE", base + "/{name}", delete, "KeyDelete"),
        # The SDKs' empty version: a trailing slash.
        ("GET", base + "/{name}/", get, "KeyGetLatest"),
        ("PATCH", base + "/{name}/", update, "KeyUpdateLatest"),
        ("GET", base + "/{name}/{version}", get, "KeyGetVersion"),
        ("PATCH", base + "/{name}/{version}", update, "KeyUpdateVersion"),
        ("POST", base + "/{name}/{version}/wrapkey", wrap, "KeyWrapVersion"),
        ("POST", base + "/{name}/{version}/unwrapkey", unwrap, "KeyUnwrapVersion"),
    ]
    deleted = vault + "/deletedkeys"
    routes += [
        ("GET", deleted, list_, "DeletedKeyList"),
        ("GET", deleted + "/{name}", get_deleted, "DeletedKeyGet"),
        ("POST", deleted + "/{name}/recover", recover, "KeyRecover"),
        ("DELETE", deleted + "/{name}", purge, "KeyPurge"),
    ]
    for method, path, handler, name in routes:
        router.add_route(method, path, handler, name=name + suffix)
