"""The key service's OpenAPI document: made from the route table (`app.make_app`), the
operations below (one per route name) and the models of `models.py`.

    python -m keyservice.api.openapi          # rewrite keyservice/openapi.json
    python -m keyservice.api.openapi --check  # exit 1 if the committed one is stale

GET /openapi.json serves the committed file; tests/keyservice/test_ks_openapi.py fails
when it differs from a fresh one or misses a route. A route added without an operation
here makes `document()` fail (daemonkit.openapi.MissingOperation).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from daemonkit.openapi import Answer, Api, Operation, Query, document, write_or_check

from . import models as m

PATH = Path(__file__).resolve().parent.parent / "openapi.json"

API = Api(
    title="keyservice", version="1.0",
    description="A key vault for the encrypted disk platform, in the shape of Azure Key Vault's "
                "key operations. See docs/keyservice-api.md.",
    error_model=m.Error, error_statuses=(400, 401, 403, 404, 409, 413), models=(m.Event,))


def _ok(model=None, status: int = 200) -> dict[int, Answer]:
    return {status: Answer("Success", model)}


_NONE: dict[int, Answer] = {204: Answer("Success")}
_BUSY = Answer("Too many key generations or imports by this identity (rate or concurrency "
               "limit); see Retry-After", m.Error, headers={"Retry-After": {"type": "integer"}})
_OAUTH = Answer("OAuth 2.0 error (RFC 6749 section 5.2)", m.OAuthError)
_API_VERSION = Query("api-version", description="Key Vault's data-plane version: 7.4, 7.5, 7.6, "
                     "2025-07-01 or later; older ones are refused (400)")
_PAGE = (Query("maxresults", {"type": "integer", "minimum": 1, "maximum": 25},
               "items per page (Key Vault's bound: 25); without it path-form calls get every item"),
         Query("$skiptoken", description="opaque; copy nextLink rather than building it"))
_VAULT_ID = Query("vaultId", {"type": "string", "format": "uuid"},
                  "a vault's chain by the vault's id, also after a purge (admins of the home tenant)")
_AUDIT_PAGE = (Query("after", {"type": "integer"}), Query("limit", {"type": "integer"}),
               Query("tail", {"type": "integer", "minimum": 1, "maximum": 10000},
                     "the last N entries instead of the first (not with limit)"),
               Query("since", {"type": "string", "format": "date-time"},
                     "only entries at or after this RFC 3339 time"))
_LATEST = " (trailing-slash form: an empty version, as the Azure SDKs send it)"


def _key(summary: str, permission: str, *, body=None, answers=None, query=(),
         description: str = "") -> Operation:
    """A key operation: it needs `permission` in the vault's access policy."""
    needs = f"Requires the `{permission}` key permission in the vault's access policy."
    return Operation(summary, "keys", body=body, answers=answers or _ok(m.KeyBundle),
                     query=(*query, _API_VERSION),
                     description=f"{description} {needs}" if description else needs)


OPERATIONS: dict[str, Operation] = {
    # the directory
    "Token": Operation("Exchange client id and secret for a bearer token (client credentials "
                       "grant)", "directory", body=m.TokenRequest, answers=_ok(m.TokenResponse),
                       public=True, description="A JSON body, or the same fields as a form."),
    "TokenV2": Operation("Client credentials grant in the Microsoft identity platform's v2.0 shape; "
                         "scope={resource}/.default", "directory", body=m.TokenRequestV2,
                         body_media_type="application/x-www-form-urlencoded",
                         answers={200: Answer("Success", m.TokenResponse), 400: _OAUTH, 401: _OAUTH},
                         public=True, errors=False),
    "OpenIdConfiguration": Operation(
        "OpenID Connect discovery for the tenant's token endpoint (what MSAL and azure-identity "
        "read)", "directory", answers={200: Answer("Success"), 400: _OAUTH}, public=True, errors=False),
    "OpenIdKeys": Operation(
        "The discovery document's jwks_uri: an empty JSON Web Key Set (tokens are verified only "
        "by this service)", "directory", answers={200: Answer("Success"), 400: _OAUTH}, public=True,
        errors=False),
    "IdentityCreate": Operation(
        "Create an identity; the client secret is returned once (admin of the tenant, or a "
        "home-tenant admin founding a new tenant; platform for managed identities)", "directory",
        body=m.IdentityCreate, answers=_ok(m.Identity, 201)),
    "IdentityList": Operation("List the identities of the caller's tenant (admin)", "directory",
                              answers=_ok(m.IdentityList)),
    "IdentityGet": Operation("Show an identity of the caller's tenant (admin)", "directory",
                             answers=_ok(m.Identity)),
    "IdentityUpdate": Operation("Disable or enable an identity of the caller's tenant (admin); "
                                "disabling revokes its tokens", "directory", body=m.IdentityUpdate,
                                answers=_ok(m.Identity)),
    "IdentityDelete": Operation("Delete an identity of the caller's tenant and its access policies "
                                "(admin)", "directory", answers=_NONE),
    "IdentitySecretReset": Operation("Reset an identity's client secret (admin); the new secret is "
                                     "returned once and its tokens are revoked", "directory",
                                     answers=_ok(m.Identity)),
    # the service
    "Health": Operation("Liveness", "service", public=True),
    "Liveness": Operation("Liveness: the process answers", "service",
                          answers={200: Answer("Alive")}, public=True, errors=False),
    "Readiness": Operation("Readiness: not shutting down and the store answers", "service",
                           answers={200: Answer("Ready"), 503: Answer("Not ready; `problems` says why")},
                           public=True, errors=False),
    "Metrics": Operation("Prometheus metrics (text exposition format); names no vault, key or "
                         "identity", "service", answers={200: Answer("Metrics")}, public=True,
                         errors=False),
    "OpenApi": Operation("This document", "service", public=True),
    # vaults and access policies
    "VaultCreate": Operation("Create a vault; the creator gets every key permission", "vaults",
                             body=m.VaultCreate, answers=_ok(m.Vault, 201)),
    "VaultList": Operation("List vaults visible to the caller", "vaults", answers=_ok(m.VaultList)),
    "VaultGet": Operation("Show a vault and its access policies", "vaults", answers=_ok(m.Vault)),
    "VaultUpdate": Operation("Change the retention, or enable purge protection (never disable)",
                             "vaults", body=m.VaultUpdate, answers=_ok(m.Vault)),
    "VaultDelete": Operation("Soft-delete a vault (owner or admin)", "vaults", answers=_ok(m.Vault)),
    "DeletedVaultList": Operation("List soft-deleted vaults", "vaults", answers=_ok(m.VaultList)),
    "DeletedVaultGet": Operation("Show a soft-deleted vault", "vaults", answers=_ok(m.Vault)),
    "VaultRecover": Operation("Recover a soft-deleted vault", "vaults", answers=_ok(m.Vault)),
    "VaultPurge": Operation("Purge a soft-deleted vault (403 under purge protection before its "
                            "scheduled purge date)", "vaults", answers=_NONE),
    "PolicyList": Operation("List access policies", "policies"),
    "PolicySet": Operation("Set an identity's key permissions (owner or admin)", "policies",
                           body=m.PolicySet, answers=_ok(m.AccessPolicy)),
    "PolicyDelete": Operation("Remove an identity's access policy", "policies", answers=_NONE),
    # keys
    "KeyList": _key("List keys (current version attributes)", "list", answers=_ok(m.KeyList),
                    query=_PAGE),
    "DeletedKeyList": _key("List soft-deleted keys", "list", answers=_ok(m.KeyList), query=_PAGE),
    "KeyVersions": _key("List a key's versions", "list", answers=_ok(m.KeyList), query=_PAGE),
    "KeyCreate": _key("Create a key, or a new version of it", "create", body=m.KeyCreate,
                      answers={200: Answer("Success", m.KeyBundle), 429: _BUSY}),
    "KeyImport": _key("Import a key (JWK with private parts, or PEM); adds a version", "import",
                      body=m.KeyImport, answers={200: Answer("Success", m.KeyBundle), 429: _BUSY}),
    "KeyRotate": _key("Rotate: add a new version of the same size", "rotate",
                      answers={200: Answer("Success", m.KeyBundle), 429: _BUSY}),
    "KeyGet": _key("Get the current version (public JWK and attributes)", "get"),
    "KeyGetLatest": _key("Get the current version (public JWK and attributes)" + _LATEST, "get"),
    "KeyGetVersion": _key("Get a version", "get"),
    "KeyUpdate": _key("Update the current version's attributes", "update", body=m.KeyUpdate),
    "KeyUpdateLatest": _key("Update the current version's attributes" + _LATEST, "update",
                            body=m.KeyUpdate),
    "KeyUpdateVersion": _key("Update a version's attributes", "update", body=m.KeyUpdate),
    "KeyWrap": _key("Wrap with the current version", "wrapKey", body=m.KeyOperation,
                    answers=_ok(m.KeyOperationResult)),
    "KeyUnwrap": _key("Unwrap with the current version", "unwrapKey", body=m.KeyOperation,
                      answers=_ok(m.KeyOperationResult)),
    "KeyWrapVersion": _key("Wrap with a version", "wrapKey", body=m.KeyOperation,
                           answers=_ok(m.KeyOperationResult)),
    "KeyUnwrapVersion": _key("Unwrap with a version", "unwrapKey", body=m.KeyOperation,
                             answers=_ok(m.KeyOperationResult)),
    "KeyDelete": _key("Soft-delete a key", "delete", answers=_ok(m.DeletedKeyBundle)),
    "DeletedKeyGet": _key("Show a soft-deleted key", "get", answers=_ok(m.DeletedKeyBundle)),
    "KeyRecover": _key("Recover a soft-deleted key", "recover"),
    "KeyPurge": _key("Purge a soft-deleted key (403 under purge protection before its scheduled "
                     "purge date)", "purge", answers=_NONE),
    "KeyBackup": _key("Back up a key (all versions)", "backup", answers=_ok(m.KeyBackup),
                      description="Backup: the key with all its versions and attributes as an "
                      "opaque blob sealed by the service (Key Vault's backup)."),
    "KeyRestore": _key("Restore a backed-up key", "restore", body=m.KeyRestore,
                       description="Restore a backup blob into this vault, under the key's own "
                       "name and version ids (409 if the name is taken, 403 for another tenant's "
                       "blob, 400 for a damaged one)."),
    # audit and the change stream
    "AuditShow": Operation("Read the vault's audit chain (owner or admin)", "audit",
                           answers=_ok(m.AuditLog), query=_AUDIT_PAGE),
    "AuditVerify": Operation("Verify the vault's audit chain", "audit",
                             answers=_ok(m.AuditVerification)),
    "ServiceAuditShow": Operation("Read the service audit chain, or with vaultId a vault's chain, "
                                  "also a purged vault's closed one (admin of the home tenant)",
                                  "audit", answers=_ok(m.AuditLog),
                                  query=(*_AUDIT_PAGE[:2], _VAULT_ID, *_AUDIT_PAGE[2:])),
    "ServiceAuditVerify": Operation("Verify the service audit chain, or with vaultId a vault's "
                                    "chain (admin of the home tenant)", "audit",
                                    answers=_ok(m.AuditVerification), query=(_VAULT_ID,)),
    "Events": Operation("Follow key and policy changes as server-sent events (admin or platform "
                        "role)", "events",
                        answers={200: Answer("Success", media_type="text/event-stream")},
                        query=(Query("since", {"type": "integer"}),),
                        description="text/event-stream; each event: `id: <seq>`, `event: <type>`, "
                        "`data: <Event JSON>`; `: keepalive` comments every few seconds. See "
                        "docs/keyservice-api.md."),
}

_HOST_FORM = ("Host form: the vault is the Host header's first label ({vault}.{domain}, "
              "`serve --vault-domain`), as Key Vault's clients address it.")


def _operation_of(route: web.AbstractRoute) -> Operation:
    name = route.name or ""
    op = OPERATIONS[name.removesuffix(".host")]
    if name.endswith(".host"):
        desc = f"{op.description} {_HOST_FORM}" if op.description else _HOST_FORM
        op = Operation(**{**op.__dict__, "description": desc})
    return op


def build() -> dict[str, Any]:
    from .app import make_app  # the routes only: nothing is started
    return document(API, make_app(service=None), _operation_of, lambda route: route.name or "")


def main(argv: list[str]) -> int:
    return write_or_check(argv, PATH, build, "keyservice.api.openapi")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
