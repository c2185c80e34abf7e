"""The token endpoint of the Microsoft identity platform (v2.0), as clients that speak to
Key Vault expect it: `azure-identity`'s ClientSecretCredential, MSAL, and any OAuth 2.0
client given this service as its authority.

    GET  /{tenant}/v2.0/.well-known/openid-configuration   OpenID Connect Discovery 1.0
    GET  /{tenant}/discovery/v2.0/keys                      its jwks_uri: an empty key set
    POST /{tenant}/oauth2/v2.0/token                        RFC 6749 section 4.4

Only the client credentials grant with a client secret (`client_secret_post` or HTTP
Basic, RFC 6749 section 2.3.1) exists here: there are no users to sign in, so no
authorization endpoint works (it is named in the discovery document because MSAL
requires the field). `scope` must name this service's resource (`{resource}/.default`,
the challenge's `resource` plus "/.default"); the token's audience is that resource.
Errors are OAuth's (`{"error", "error_description"}`, RFC 6749 section 5.2), which is
what these clients parse, not Key Vault's error body.
"""
import base64
import binascii
import uuid

from aiohttp import web

from daemonkit.bodies import BodyError, parse

from ..domain import errors
from .body import form_body
from .models import TokenRequestV2

_IGNORED_SCOPES = {"openid", "profile", "offline_access"}  # OIDC scopes MSAL may add


def _tenant(request: web.Request) -> str:
    """The path's tenant id, canonical (lower case), or "" when it is not a UUID."""
    try:
        return str(uuid.UUID(request.match_info["tenant"]))
    except ValueError:
        return ""


def oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


async def openid_configuration(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    if not tenant:
        return oauth_error(400, "invalid_tenant", "The tenant must be a tenant id (a UUID)")
    base = f"{request.app['addressing'].authority}/{tenant}"
    return web.json_response({
        "issuer": f"{base}/v2.0",
        "token_endpoint": f"{base}/oauth2/v2.0/token",
        "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",  # required by MSAL; no users here
        # Required by OpenID Connect Discovery 1.0 section 3 and by MSAL for JavaScript
        # (which refuses the document without it). The set is empty: tokens are signed
        # with a key only this service holds, so nobody else can or need verify them.
        "jwks_uri": f"{base}/discovery/v2.0/keys",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "grant_types_supported": ["client_credentials"],
        "response_types_supported": ["token"],
        "scopes_supported": [f"{request.app['addressing'].resource}/.default"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["HS256"],
        "tenant_region_scope": None,
    })


async def openid_keys(request: web.Request) -> web.Response:
    if not _tenant(request):
        return oauth_error(400, "invalid_tenant", "The tenant must be a tenant id (a UUID)")
    return web.json_response({"keys": []})


def _client_from_basic(request: web.Request) -> tuple[str | None, str | None]:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        cid, sep, secret = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return (cid, secret) if sep else (None, None)


def audience_of(scope: str | None) -> str | None:
    """The resource of `{resource}/.default` in a space-separated scope list."""
    resources = [s for s in (scope or "").split() if s not in _IGNORED_SCOPES]
    if len(resources) != 1 or not resources[0].endswith("/.default"):
        raise errors.BadRequest("scope must be exactly one '{resource}/.default'",
                                code="invalid_scope")
    return resources[0][: -len("/.default")].rstrip("/")


async def token(request: web.Request) -> web.Response:
    """Client credentials grant; answers in the shape MSAL reads."""
    domain = request.app["domain"]
    tenant = _tenant(request)
    if not tenant:
        return oauth_error(400, "invalid_request", "The tenant must be a tenant id (a UUID)")
    if request.content_type != "application/x-www-form-urlencoded":
        return oauth_error(400, "invalid_request",
                           "The body must be application/x-www-form-urlencoded (RFC 6749 section 4.4.2)")
    try:
        form = await form_body(request)
    except errors.BadRequest as e:
        return oauth_error(400, "invalid_request", e.message)
    try:
        body = parse(TokenRequestV2, {k: form[k] for k in TokenRequestV2.model_fields if k in form})
    except BodyError as e:
        return oauth_error(400, "invalid_request", e.message)
    if body.grant_type != "client_credentials":
        return oauth_error(400, "unsupported_grant_type",
                           "Only grant_type=client_credentials is supported")
    client_id, secret = _client_from_basic(request)
    client_id = body.client_id or client_id
    secret = body.client_secret or secret
    if not isinstance(client_id, str) or not isinstance(secret, str) or not client_id or not secret:
        return oauth_error(400, "invalid_request", "client_id and client_secret are required "
                           "(certificate and assertion credentials are not supported)")
    try:
        audience = audience_of(body.scope)
        tok, _, ident = await domain.run(domain.service.issue_token, client_id, secret,
                                         audience, tenant)
    except errors.BadRequest as e:
        request["error_code"] = e.code
        return oauth_error(400, "invalid_scope" if e.code == "invalid_scope" else "invalid_request",
                           e.message)
    except errors.Unauthorized as e:
        request["error_code"] = "invalid_client"
        return oauth_error(401, "invalid_client", e.message)
    request["caller_hint"] = ident.object_id
    lifetime = domain.service.signer.lifetime
    return web.json_response({"token_type": "Bearer", "expires_in": lifetime,
                              "ext_expires_in": lifetime, "access_token": tok},
                             headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration,
                   name="OpenIdConfiguration")
    router.add_get("/{tenant}/discovery/v2.0/keys", openid_keys, name="OpenIdKeys")
    router.add_post("/{tenant}/oauth2/v2.0/token", token, name="TokenV2")
