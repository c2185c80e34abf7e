"""Identities, tokens, health and the OpenAPI document."""
from pathlib import Path

from aiohttp import web

from ..domain.errors import BadRequest
from . import models, render
from .body import form_body, model_body, validated

OPENAPI = Path(__file__).resolve().parent.parent / "openapi.json"


async def token(request: web.Request) -> web.Response:
    """OAuth 2.0 client credentials grant (RFC 6749 section 4.4); form or JSON body.
    `resource` (optional, Azure AD v1's name for it) stamps the token's audience;
    without it the token has none, as before audiences existed (see tokens.py)."""
    domain = request.app["domain"]
    if request.content_type == "application/x-www-form-urlencoded":
        form = await form_body(request)
        body = validated(models.TokenRequest, {k: form[k] for k in models.TokenRequest.model_fields
                                               if k in form})
    else:
        body = await model_body(request, models.TokenRequest)
    if body.grant_type not in (None, "client_credentials"):
        raise BadRequest("grant_type must be client_credentials")
    tok, exp, ident = await domain.run(domain.service.issue_token, body.client_id,
                                       body.client_secret, _resource(body.resource))
    request["caller_hint"] = ident.object_id
    return web.json_response({"access_token": tok, "token_type": "Bearer",
                              "expires_in": domain.service.signer.lifetime, "expires_on": exp})


def _resource(value: str | None) -> str | None:
    return value.rstrip("/") if value else None


async def create_identity(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    body = await model_body(request, models.IdentityCreate)
    ident, secret = await domain.run(
        domain.service.create_identity, request["caller"], body.displayName,
        "managedIdentity" if body.type is None else body.type,
        [] if body.roles is None else body.roles, body.tenantId)
    return web.json_response(render.identity(ident, secret), status=201)


async def list_identities(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    idents = await domain.run(domain.service.list_identities, request["caller"])
    return web.json_response({"value": [render.identity(i) for i in idents], "nextLink": None})


async def show_identity(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    ident = await domain.run(domain.service.get_identity, request["caller"],
                             request.match_info["object_id"])
    return web.json_response(render.identity(ident))


async def update_identity(request: web.Request) -> web.Response:
    """PATCH {"enabled": false|true}: a disabled identity gets no token and its tokens stop working."""
    domain = request.app["domain"]
    body = await model_body(request, models.IdentityUpdate)
    ident = await domain.run(domain.service.set_identity_enabled, request["caller"],
                             request.match_info["object_id"], body.enabled)
    return web.json_response(render.identity(ident))


async def delete_identity(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    await domain.run(domain.service.delete_identity, request["caller"], request.match_info["object_id"])
    return web.Response(status=204)


async def reset_secret(request: web.Request) -> web.Response:
    domain = request.app["domain"]
    ident, secret = await domain.run(domain.service.reset_identity_secret, request["caller"],
                                     request.match_info["object_id"])
    return web.json_response(render.identity(ident, secret))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/oauth2/token", token, name="Token")
    router.add_post("/identities", create_identity, name="IdentityCreate")
    router.add_get("/identities", list_identities, name="IdentityList")
    router.add_get("/identities/{object_id}", show_identity, name="IdentityGet")
    router.add_patch("/identities/{object_id}", update_identity, name="IdentityUpdate")
    router.add_delete("/identities/{object_id}", delete_identity, name="IdentityDelete")
    router.add_post("/identities/{object_id}/secret", reset_secret, name="IdentitySecretReset")
    router.add_get("/health", health, name="Health")
    router.add_get("/openapi.json", openapi, name="OpenApi")
