"""Authorization matrix of the key service: every key operation x every permission set x
every key state, against the real daemon over HTTP.

Permission sets: none (no access policy at all), each of the 12 key permissions alone,
and all of them: 14 identities, each with its own token. (`restore` is not in the matrix:
its outcome depends on a blob, not on the key's state; tests/keyservice/test_ks_azure_sdk.py
checks that it needs its permission.) Key states: enabled, disabled,
expired, not yet valid, soft-deleted. For every (operation, identity, state):

- without the operation's permission the answer is 403 AccessDenied, whatever the key's
  state (no 404 either: a caller without permission learns nothing about the key);
- with it, the outcome is the one the key's state allows (2xx, or the state's refusal:
  403 KeyDisabled/KeyExpired/KeyNotYetValid for wrap/unwrap, 404 for a deleted or a
  not-deleted key, 409 for a name held by a deleted key).

Operations that change state run on a fresh key (imported from a PEM made once, so no RSA
generation per case); the others share one key per state. The vault has no purge
protection, so that purge can succeed when it is allowed.

Both matrices run twice: on software keys (RSA) and on keys made in a SoftHSM2 token
(RSA-HSM, which cannot be imported: those are created). The permission rules are the
same; the one difference in outcome is backup, which RSA-HSM keys refuse (403
KeyNotBackupable) to a caller who holds the permission.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers.platform import Stack, _http
from tests.helpers.softhsm import make_token

PERMS = ("get", "list", "create", "import", "update", "delete", "recover", "purge",
         "wrapKey", "unwrapKey", "rotate", "backup")
PERM_SETS = {"none": ()} | {p: (p,) for p in PERMS} | {"all": PERMS}
STATES = ("enabled", "disabled", "expired", "notyetvalid", "deleted")
VAULT = "matrixvault"


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


# operation -> (permission, mutates, request(key) -> (method, path, body))
OPS: dict[str, tuple[str, bool, Callable[[str, dict], tuple[str, str, Any]]]] = {
    "get": ("get", False, lambda k, c: ("GET", f"/vaults/{VAULT}/keys/{k}", None)),
    "list": ("list", False, lambda k, c: ("GET", f"/vaults/{VAULT}/keys", None)),
    "listVersions": ("list", False, lambda k, c: ("GET", f"/vaults/{VAULT}/keys/{k}/versions", None)),
    "listDeleted": ("list", False, lambda k, c: ("GET", f"/vaults/{VAULT}/deletedkeys", None)),
    "getDeleted": ("get", False, lambda k, c: ("GET", f"/vaults/{VAULT}/deletedkeys/{k}", None)),
    "create": ("create", True, lambda k, c: ("POST", f"/vaults/{VAULT}/keys/{k}/create",
                                             {"kty": c["kty"], "key_size": 2048})),
    "import": ("import", True, lambda k, c: ("PUT", f"/vaults/{VAULT}/keys/{k}", {"pem": c["pem"]})),
    "update": ("update", True, lambda k, c: ("PATCH", f"/vaults/{VAULT}/keys/{k}",
                                             {"attributes": {}})),
    "delete": ("delete", True, lambda k, c: ("DELETE", f"/vaults/{VAULT}/keys/{k}", None)),
    "recover": ("recover", True, lambda k, c: ("POST", f"/vaults/{VAULT}/deletedkeys/{k}/recover", None)),
    "purge": ("purge", True, lambda k, c: ("DELETE", f"/vaults/{VAULT}/deletedkeys/{k}", None)),
    "wrapKey": ("wrapKey", False, lambda k, c: ("POST", f"/vaults/{VAULT}/keys/{k}/wrapkey",
                                               {"alg": "RSA-OAEP-256", "value": b64u(b"k" * 32)})),
    "unwrapKey": ("unwrapKey", False, lambda k, c: ("POST", f"/vaults/{VAULT}/keys/{k}/unwrapkey",
                                                   {"alg": "RSA-OAEP-256", "value": c["wrapped"][k]})),
    "rotate": ("rotate", True, lambda k, c: ("POST", f"/vaults/{VAULT}/keys/{k}/rotate", None)),
    "backup": ("backup", False, lambda k, c: ("POST", f"/vaults/{VAULT}/keys/{k}/backup", None)),
}

# Outcome allowed by the key's state, for a caller holding the permission.
USABILITY = {"disabled": "KeyDisabled", "expired": "KeyExpired", "notyetvalid": "KeyNotYetValid"}


def expected_with_permission(op: str, state: str, kty: str = "RSA") -> tuple[int, str | None]:
    deleted = state == "deleted"
    if op in ("list", "listDeleted"):
        return 200, None
    if op in ("getDeleted", "recover", "purge"):
        return (200 if op != "purge" else 204, None) if deleted else (404, None)
    if deleted:
        return (409, None) if op in ("create", "import") else (404, None)
    if op in ("wrapKey", "unwrapKey") and state in USABILITY:
        return 403, USABILITY[state]
    if op == "backup" and kty == "RSA-HSM":
        return 403, "KeyNotBackupable"
    return 200, None


@pytest.fixture(scope="module", params=["RSA", "RSA-HSM"])
def matrix(request, tmp_path_factory):
    ks_args = []
    if request.param == "RSA-HSM":
        ks_args = make_token(tmp_path_factory.mktemp("hsm")).serve_args()
    stack = Stack(tmp_path_factory.mktemp("authz"), ks_args=ks_args)
    stack.start_keyservice()
    status, body = stack.ks_api("POST", "/vaults", {"name": VAULT, "location": "local",
                                                    "subscription": "s1"})
    assert status in (200, 201), body
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    ctx = {"pem": pem, "wrapped": {}, "stack": stack, "n": 0, "kty": request.param}
    ctx["shared"] = {state: make_key(ctx, f"shared-{state}", state) for state in STATES}
    ctx["tokens"] = {}
    for name, perms in PERM_SETS.items():
        status, ident = stack.ks_api("POST", "/identities", {"displayName": f"matrix-{name}",
                                                             "type": "servicePrincipal"})
        assert status in (200, 201), ident
        if perms:
            status, body = stack.ks_api("PUT", f"/vaults/{VAULT}/accessPolicies/{ident['objectId']}",
                                        {"permissions": {"keys": list(perms)}})
            assert status in (200, 201), body
        status, tok = _http(stack.ks_url, "POST", "/oauth2/token", {
            "grant_type": "client_credentials", "client_id": ident["clientId"],
            "client_secret": ident["clientSecret"]})
        assert status == 200, tok
        ctx["tokens"][name] = tok["access_token"]
    yield ctx
    try:
        stack.ks.assert_healthy()
    finally:
        stack.close()


def make_key(ctx, name: str, state: str) -> str:
    """A key imported by the admin (created in the token for RSA-HSM), with a wrapped value
    for unwrap, put into `state`."""
    stack = ctx["stack"]
    for _ in range(30):  # imports are rate-limited per identity: honour Retry-After
        if ctx["kty"] == "RSA-HSM":
            status, body = stack.ks_api("POST", f"/vaults/{VAULT}/keys/{name}/create",
                                        {"kty": "RSA-HSM", "key_size": 2048})
        else:
            status, body = stack.ks_api("PUT", f"/vaults/{VAULT}/keys/{name}", {"pem": ctx["pem"]})
        if status != 429:
            break
        time.sleep(1)  # the server's Retry-After (whole seconds); a back-off, not a sync
    assert status == 200, body
    status, body = stack.ks_api("POST", f"/vaults/{VAULT}/keys/{name}/wrapkey",
                                {"alg": "RSA-OAEP-256", "value": b64u(os.urandom(32))})
    assert status == 200, body
    ctx["wrapped"][name] = body["value"]
    now = int(time.time())
    change = {"disabled": ("PATCH", {"attributes": {"enabled": False}}),
              "expired": ("PATCH", {"attributes": {"exp": now - 3600}}),
              "notyetvalid": ("PATCH", {"attributes": {"nbf": now + 3600}}),
              "deleted": ("DELETE", None)}.get(state)
    if change:
        status, body = stack.ks_api(change[0], f"/vaults/{VAULT}/keys/{name}", change[1])
        assert status == 200, body
    return name


def inner_code(body) -> str | None:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    inner = err.get("innererror") or {}
    return inner.get("code")


@pytest.mark.parametrize("op", list(OPS))
def test_authorization_matrix(matrix, op):
    permission, mutates, request = OPS[op]
    stack = matrix["stack"]
    failures = []
    successes = 0
    for set_name, perms in PERM_SETS.items():
        allowed = permission in perms
        for state in STATES:
            if mutates and allowed:
                matrix["n"] += 1
                key = make_key(matrix, f"m{matrix['n']}-{op.lower()}", state)
            else:
                key = matrix["shared"][state]
            method, path, body = request(key, matrix)
            status, out = _http(stack.ks_url, method, path, body, token=matrix["tokens"][set_name])
            case = f"{op} by '{set_name}' on {state} key -> {status} {out}"
            if not allowed:
                if status != 403 or inner_code(out) != "AccessDenied":
                    failures.append("without permission: " + case)
                continue
            successes += 200 <= status < 300
            want_status, want_inner = expected_with_permission(op, state, matrix["kty"])
            if status != want_status or (want_inner and inner_code(out) != want_inner):
                failures.append(f"expected {want_status} {want_inner or ''}: " + case)
    assert not failures, "\n".join(failures[:20])
    if not (op == "backup" and matrix["kty"] == "RSA-HSM"):
        assert successes > 0, f"{op}: no call succeeded even with its permission"


# --------------------------------------------------------------------------- tenants
# Identity kinds: the three directory types without roles, and the two roles. Own tenant: the
# vault's; other tenant: one the home admin founded, whose identities its own admin made.
KINDS = {"user": ("user", []), "servicePrincipal": ("servicePrincipal", []),
         "managedIdentity": ("managedIdentity", []), "admin": ("user", ["admin"]),
         "platform": ("servicePrincipal", ["platform"])}
# Vault-level operations beside the key operations (OPS).
VAULT_OPS = {
    "vaultGet": ("GET", f"/vaults/{VAULT}", None),
    "vaultUpdate": ("PATCH", f"/vaults/{VAULT}", {"enablePurgeProtection": False}),
    "policyList": ("GET", f"/vaults/{VAULT}/accessPolicies", None),
    "policySet": ("PUT", f"/vaults/{VAULT}/accessPolicies/00000000-0000-0000-0000-00000000beef",
                  {"permissions": {"keys": ["get"]}}),
    "audit": ("GET", f"/vaults/{VAULT}/audit", None),
}


def _token(stack, ident) -> str:
    status, tok = _http(stack.ks_url, "POST", "/oauth2/token", {
        "grant_type": "client_credentials", "client_id": ident["clientId"],
        "client_secret": ident["clientSecret"]})
    assert status == 200, tok
    return tok["access_token"]


@pytest.fixture(scope="module")
def tenants(matrix):
    """A token per (kind, tenant). Every identity gets every key permission on the vault by
    its object id: a policy must not carry across tenants."""
    stack = matrix["stack"]
    other = str(uuid.uuid4())
    status, founder = stack.ks_api("POST", "/identities", {"displayName": "founder", "type": "user",
                                                           "roles": ["admin"], "tenantId": other})
    assert status == 201, founder
    founder_token = _token(stack, founder)
    tokens = {}
    for kind, (type_, roles) in KINDS.items():
        for tenant in ("own", "other"):
            body = {"displayName": f"{kind}-{tenant}", "type": type_, "roles": roles}
            if tenant == "own":
                status, ident = stack.ks_api("POST", "/identities", body)
            else:
                status, ident = _http(stack.ks_url, "POST", "/identities", body, token=founder_token)
            assert status == 201, ident
            status, out = stack.ks_api("PUT", f"/vaults/{VAULT}/accessPolicies/{ident['objectId']}",
                                       {"permissions": {"keys": ["all"]}})
            assert status == 200, out
            tokens[(kind, tenant)] = _token(stack, ident)
    return tokens


@pytest.mark.parametrize("op", list(OPS) + list(VAULT_OPS))
def test_tenant_matrix(matrix, tenants, op):
    """Every operation x identity kind x own/other tenant. Another tenant's identity gets 401
    for everything (a token of another tenant, as Key Vault answers), whatever its roles and
    its policy entry, and nothing changes; an own-tenant identity holding every permission
    gets what the key's state allows for key operations."""
    stack = matrix["stack"]
    failures = []
    for (kind, tenant), token in tenants.items():
        for state in STATES:
            if op in OPS:
                permission, mutates, request = OPS[op]
                if mutates and tenant == "own":
                    if state not in ("enabled", "deleted"):
                        continue  # key states are the first matrix's; imports are rate-limited
                    matrix["n"] += 1
                    key = make_key(matrix, f"t{matrix['n']}-{op.lower()}", state)
                else:
                    key = matrix["shared"][state]
                method, path, body = request(key, matrix)
            else:
                if state != STATES[0]:
                    continue  # vault operations do not depend on a key's state
                method, path, body = VAULT_OPS[op]
            status, out = _http(stack.ks_url, method, path, body, token=token)
            case = f"{op} by {kind} of the {tenant} tenant on {state} key -> {status} {out}"
            if tenant == "other":
                if status != 401:
                    failures.append("other tenant: " + case)
            elif op in OPS:
                want_status, want_inner = expected_with_permission(op, state, matrix["kty"])
                if status != want_status or (want_inner and inner_code(out) != want_inner):
                    failures.append(f"expected {want_status} {want_inner or ''}: " + case)
            elif op in ("vaultGet", "policyList") and status != 200:
                failures.append("own tenant with a policy may read the vault: " + case)
            elif op in ("vaultUpdate", "policySet", "audit"):
                manager = kind == "admin"
                if (200 <= status < 300) != manager or (not manager and status != 403):
                    failures.append("vault management is for the owner or an admin: " + case)
    assert not failures, "\n".join(failures[:20])
    # The vault and the shared keys are as they were: nothing of another tenant got through.
    status, body = stack.ks_api("GET", f"/vaults/{VAULT}/keys/{matrix['shared']['enabled']}")
    assert status == 200 and body["attributes"]["enabled"] is True
