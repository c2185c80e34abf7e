"""Tenant isolation of the directory (issue 19, item 1), against the real daemon.

The attack: an admin of one tenant creates an admin in another tenant, which grants
itself every key permission on that tenant's vault and unwraps its keys. Admins are
confined to their tenant; only a home-tenant admin may found a *new* tenant. A planted
identity can be listed, disabled (its live tokens die), have its secret reset, and be
deleted.
"""
import base64
import json
import uuid

from keyservice.client import Credential


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_identity(daemon, as_, name, tenant=None, roles=(), type_="user"):
    body = {"displayName": name, "type": type_, "roles": list(roles)}
    if tenant:
        body["tenantId"] = tenant
    status, got = daemon.http("POST", "/identities", body, as_=as_)
    return status, got


def cred(body) -> Credential:
    return Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])


def fresh_token(daemon, c: Credential):
    status, body = daemon.http("POST", "/oauth2/token", {
        "grant_type": "client_credentials", "client_id": c.client_id,
        "client_secret": c.client_secret}, token=None)
    return status, (body or {}).get("access_token"), body


def test_admin_cannot_plant_an_identity_in_another_tenant(make_daemon):
    d = make_daemon()
    tenant_a, tenant_b = str(uuid.uuid4()), str(uuid.uuid4())
    # The home admin founds two tenants, each with its own admin.
    status, body = make_identity(d, d.admin, "admin-a", tenant_a, ["admin"])
    assert status == 201 and body["tenantId"] == tenant_a
    admin_a = cred(body)
    status, body = make_identity(d, d.admin, "admin-b", tenant_b, ["admin"])
    assert status == 201
    admin_b = cred(body)
    # The victim: tenant B's vault with a key.
    assert d.http("POST", "/vaults", {"name": "victim-b", "location": "l", "subscription": "s"},
                  as_=admin_b)[0] == 201
    assert d.http("POST", "/vaults/victim-b/keys/k/create", {"key_size": 2048}, as_=admin_b)[0] == 200
    status, w = d.http("POST", "/vaults/victim-b/keys/k/wrapkey", {"value": b64u(b"dek" * 8)}, as_=admin_b)
    assert status == 200

    # The attack: admin A creates an admin in tenant B.
    status, body = make_identity(d, admin_a, "mole", tenant_b, ["admin"])
    assert status == 403, body
    assert "own tenant" in body["error"]["message"]
    # ... nor in the home tenant, nor can a non-home admin found a new tenant.
    assert make_identity(d, admin_a, "mole", d.admin.tenant_id, ["admin"])[0] == 403
    assert make_identity(d, admin_a, "mole", str(uuid.uuid4()), ["admin"])[0] == 403
    # The home admin cannot add to an existing tenant either (only found new ones).
    status, body = make_identity(d, d.admin, "mole", tenant_b, ["admin"])
    assert status == 403 and "already exists" in body["error"]["message"]
    # Tenant B's identities are still only its own admin: nothing was planted.
    status, body = d.http("GET", "/identities", as_=admin_b)
    assert status == 200 and [i["objectId"] for i in body["value"]] == [admin_b.object_id]
    # Without a planted identity, A reaches nothing in B.
    status, _ = d.http("POST", "/vaults/victim-b/keys/k/unwrapkey", {"value": w["value"]}, as_=admin_a)
    assert status == 401
    # An admin creates in its own tenant as before (tenantId omitted or its own).
    assert make_identity(d, admin_a, "ok", None)[0] == 201
    assert make_identity(d, admin_a, "ok2", tenant_a)[0] == 201


def test_identity_management_is_tenant_confined_and_revokes_tokens(make_daemon):
    d = make_daemon()
    tenant_b = str(uuid.uuid4())
    admin_b = cred(make_identity(d, d.admin, "admin-b", tenant_b, ["admin"])[1])
    planted = cred(make_identity(d, admin_b, "planted", None, [])[1])
    plain = cred(make_identity(d, admin_b, "plain", None, [])[1])
    d.http("POST", "/vaults", {"name": "vault-b", "location": "l", "subscription": "s"}, as_=admin_b)
    assert d.http("PUT", f"/vaults/vault-b/accessPolicies/{planted.object_id}",
                  {"permissions": {"keys": ["all"]}}, as_=admin_b)[0] == 200
    status, live_token, _ = fresh_token(d, planted)
    assert status == 200 and d.http("GET", "/vaults/vault-b/keys", token=live_token)[0] == 200

    # The home admin sees only the home tenant, and B's identities are "not found" to it.
    status, body = d.http("GET", "/identities")
    assert status == 200 and {i["tenantId"] for i in body["value"]} == {d.admin.tenant_id}
    for method, path, payload in (("GET", "", None), ("PATCH", "", {"enabled": False}),
                                  ("DELETE", "", None), ("POST", "/secret", None)):
        status, body = d.http(method, f"/identities/{planted.object_id}{path}", payload)
        assert status == 404 and body["error"]["code"] == "IdentityNotFound", (method, path, body)
    # A non-admin of B may not manage identities.
    assert d.http("GET", "/identities", as_=plain)[0] == 403
    assert d.http("PATCH", f"/identities/{planted.object_id}", {"enabled": False}, as_=plain)[0] == 403
    # Nobody disables or deletes itself (no lock-out by accident).
    assert d.http("PATCH", f"/identities/{admin_b.object_id}", {"enabled": False}, as_=admin_b)[0] == 409
    assert d.http("DELETE", f"/identities/{admin_b.object_id}", as_=admin_b)[0] == 409

    # Disable: the live token stops working at once, and no new token is issued.
    status, body = d.http("PATCH", f"/identities/{planted.object_id}", {"enabled": False}, as_=admin_b)
    assert status == 200 and body["enabled"] is False
    status, body = d.http("GET", "/vaults/vault-b/keys", token=live_token)
    assert status == 401 and "disabled" in body["error"]["message"]
    assert fresh_token(d, planted)[0] == 401
    # Enable: a new token works; the token from before the disable stays dead.
    assert d.http("PATCH", f"/identities/{planted.object_id}", {"enabled": True}, as_=admin_b)[0] == 200
    status, token2, _ = fresh_token(d, planted)
    assert status == 200 and d.http("GET", "/vaults/vault-b/keys", token=token2)[0] == 200
    assert d.http("GET", "/vaults/vault-b/keys", token=live_token)[0] == 401

    # Reset the secret: returned once; the old secret and its tokens stop working.
    status, body = d.http("POST", f"/identities/{planted.object_id}/secret", as_=admin_b)
    assert status == 200 and body["clientSecret"] and body["clientSecret"] != planted.client_secret
    assert fresh_token(d, planted)[0] == 401
    assert d.http("GET", "/vaults/vault-b/keys", token=token2)[0] == 401
    renewed = cred(body)
    status, token3, _ = fresh_token(d, renewed)
    assert status == 200 and d.http("GET", "/vaults/vault-b/keys", token=token3)[0] == 200
    status, body = d.http("GET", f"/identities/{planted.object_id}", as_=admin_b)
    assert status == 200 and "clientSecret" not in body

    # Delete: tokens die and its access policies go with it.
    assert d.http("DELETE", f"/identities/{planted.object_id}", as_=admin_b)[0] == 204
    assert d.http("GET", "/vaults/vault-b/keys", token=token3)[0] == 401
    assert fresh_token(d, renewed)[0] == 401
    status, body = d.http("GET", "/vaults/vault-b/accessPolicies", as_=admin_b)
    assert planted.object_id not in [p["objectId"] for p in body["value"]]
    status, body = d.http("GET", "/identities", as_=admin_b)
    assert sorted(i["objectId"] for i in body["value"]) == sorted([admin_b.object_id, plain.object_id])


def test_identity_cli_verbs(make_daemon, tmp_path):
    d = make_daemon()

    def out(*args, **kw):
        return json.loads(d.cli(*args, **kw).stdout)
    cred_file = tmp_path / "planted.credential"
    made = out("identity", "create", "planted", "--output-credential", str(cred_file))
    oid = made["objectId"]
    assert oid in [i["objectId"] for i in out("identity", "list")["value"]]
    assert out("identity", "show", oid)["enabled"] is True
    assert out("identity", "disable", oid)["enabled"] is False
    r = d.cli("vault", "list", cred_path=cred_file, check=False)
    assert r.returncode == 1 and "disabled" in r.stderr
    assert out("identity", "enable", oid)["enabled"] is True
    assert d.cli("vault", "list", cred_path=cred_file).returncode == 0
    new_file = tmp_path / "renewed.credential"
    reset = out("identity", "reset-secret", oid, "--output-credential", str(new_file))
    assert reset["clientSecret"] != made["clientSecret"]
    assert d.cli("vault", "list", cred_path=cred_file, check=False).returncode == 1
    assert d.cli("vault", "list", cred_path=new_file).returncode == 0
    out("identity", "delete", oid)
    assert d.cli("vault", "list", cred_path=new_file, check=False).returncode == 1
    tenant = str(uuid.uuid4())
    assert out("identity", "create", "founder", "--role", "admin", "--tenant-id", tenant)["tenantId"] == tenant
