"""The model end to end: the real daemon, spoken to over HTTP, with its state in
SQLite and in PostgreSQL (issue 15: the same tests against both)."""
import base64
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import STATES


@pytest.fixture(scope="module", params=STATES)
def state(request):
    return request.param


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def unb64u(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def create_key(daemon, vault, name, size=2048, **kw):
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/{name}/create",
                               {"kty": "RSA", "key_size": size, **kw})
    assert status == 200, body
    return body


def test_vault_shape_and_creator_policy(daemon, vault):
    status, body = daemon.http("GET", f"/vaults/{vault}")
    assert status == 200
    assert body["softDeleteEnabled"] is True and body["softDeleteRetentionInDays"] == 90
    assert body["enablePurgeProtection"] is False
    assert body["location"] == "westeurope" and body["subscription"] == "sub-1"
    [policy] = body["accessPolicies"]
    assert policy["objectId"] == daemon.admin.object_id
    assert "unwrapKey" in policy["permissions"]["keys"] and "purge" in policy["permissions"]["keys"]


def test_key_lifecycle_versions_and_wrap(daemon, vault):
    bundle = create_key(daemon, vault, "k1")
    kid1 = bundle["key"]["kid"]
    assert kid1.startswith(f"{daemon.url}/vaults/{vault}/keys/k1/")
    assert bundle["key"]["kty"] == "RSA" and bundle["attributes"]["enabled"] is True
    assert "d" not in bundle["key"] and "p" not in bundle["key"]  # never private parts
    dek = os.urandom(64)
    status, w = daemon.http("POST", f"/vaults/{vault}/keys/k1/wrapkey", {"alg": "RSA-OAEP-256", "value": b64u(dek)})
    assert status == 200 and w["kid"] == kid1
    # Independent check: the public JWK decrypts nothing, but the wrapped value is
    # RSA-OAEP-256 under it: re-wrap locally and let the service unwrap ours.
    n = int.from_bytes(unb64u(bundle["key"]["n"]), "big")
    e = int.from_bytes(unb64u(bundle["key"]["e"]), "big")
    pub = rsa.RSAPublicNumbers(e, n).public_key()
    ours = pub.encrypt(dek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    status, u = daemon.http("POST", f"/vaults/{vault}/keys/k1/unwrapkey", {"value": b64u(ours)})
    assert status == 200 and unb64u(u["value"]) == dek
    # rotate: a new current version; the old one still unwraps what it wrapped
    status, rotated = daemon.http("POST", f"/vaults/{vault}/keys/k1/rotate")
    assert status == 200 and rotated["key"]["kid"] != kid1
    version1 = kid1.rsplit("/", 1)[1]
    status, u = daemon.http("POST", f"/vaults/{vault}/keys/k1/{version1}/unwrapkey", {"value": w["value"]})
    assert status == 200 and unb64u(u["value"]) == dek
    status, cur = daemon.http("GET", f"/vaults/{vault}/keys/k1")
    assert cur["key"]["kid"] == rotated["key"]["kid"]
    status, vs = daemon.http("GET", f"/vaults/{vault}/keys/k1/versions")
    assert [v["kid"] for v in vs["value"]] == [kid1, rotated["key"]["kid"]]
    status, one = daemon.http("GET", f"/vaults/{vault}/keys/k1/{version1}")
    assert status == 200 and one["key"]["kid"] == kid1
    status, listing = daemon.http("GET", f"/vaults/{vault}/keys")
    assert [k["kid"] for k in listing["value"]] == [f"{daemon.url}/vaults/{vault}/keys/k1"]


def test_rsa_oaep_sha1_and_sizes(daemon, vault):
    create_key(daemon, vault, "k4096", size=4096)
    status, w = daemon.http("POST", f"/vaults/{vault}/keys/k4096/wrapkey", {"alg": "RSA-OAEP", "value": b64u(b"x" * 32)})
    assert status == 200 and len(unb64u(w["value"])) == 512
    status, u = daemon.http("POST", f"/vaults/{vault}/keys/k4096/unwrapkey", {"alg": "RSA-OAEP", "value": w["value"]})
    assert unb64u(u["value"]) == b"x" * 32
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/kdef/create", {"kty": "RSA"})
    assert status == 200 and len(unb64u(body["key"]["n"])) == 3072 // 8


def test_import_pem_and_jwk(daemon, vault):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    status, body = daemon.http("PUT", f"/vaults/{vault}/keys/imported", {"pem": pem})
    assert status == 200, body
    status, w = daemon.http("POST", f"/vaults/{vault}/keys/imported/wrapkey", {"value": b64u(b"dek")})
    pad = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    assert private.decrypt(unb64u(w["value"]), pad) == b"dek"  # the oracle: our own copy of the key
    nums = private.private_numbers()
    def i(x):
        return b64u(x.to_bytes((x.bit_length() + 7) // 8, "big"))

    jwk = {"kty": "RSA", "n": i(nums.public_numbers.n), "e": i(nums.public_numbers.e), "d": i(nums.d),
           "p": i(nums.p), "q": i(nums.q), "dp": i(nums.dmp1), "dq": i(nums.dmq1), "qi": i(nums.iqmp)}
    status, body = daemon.http("PUT", f"/vaults/{vault}/keys/imported", {"key": jwk})
    assert status == 200, body
    status, vs = daemon.http("GET", f"/vaults/{vault}/keys/imported/versions")
    assert len(vs["value"]) == 2


def test_disable_expire_nbf_refuse_wrap(daemon, vault):
    create_key(daemon, vault, "k")
    def wrap():
        return daemon.http("POST", f"/vaults/{vault}/keys/k/wrapkey", {"value": b64u(b"v")})

    status, _ = daemon.http("PATCH", f"/vaults/{vault}/keys/k", {"attributes": {"enabled": False}})
    status, body = wrap()
    assert status == 403 and body["error"]["innererror"]["code"] == "KeyDisabled"
    daemon.http("PATCH", f"/vaults/{vault}/keys/k", {"attributes": {"enabled": True, "exp": 1000}})
    status, body = wrap()
    assert status == 403 and "expired" in body["error"]["message"]
    daemon.http("PATCH", f"/vaults/{vault}/keys/k", {"attributes": {"exp": None, "nbf": 2**39}})
    status, body = wrap()
    assert status == 403 and body["error"]["innererror"]["code"] == "KeyNotYetValid"
    daemon.http("PATCH", f"/vaults/{vault}/keys/k", {"attributes": {"nbf": None}, "key_ops": ["unwrapKey"]})
    status, body = wrap()
    assert status == 403 and body["error"]["innererror"]["code"] == "KeyOperationNotAllowed"
    daemon.http("PATCH", f"/vaults/{vault}/keys/k", {"key_ops": ["wrapKey", "unwrapKey"]})
    assert wrap()[0] == 200


def test_delete_recover_purge_key(daemon, vault):
    create_key(daemon, vault, "k")
    status, body = daemon.http("DELETE", f"/vaults/{vault}/keys/k")
    assert status == 200 and body["recoveryId"].endswith(f"/vaults/{vault}/deletedkeys/k")
    assert body["scheduledPurgeDate"] - body["deletedDate"] == 90 * 86400
    assert daemon.http("POST", f"/vaults/{vault}/keys/k/wrapkey", {"value": b64u(b"v")})[0] == 404
    assert daemon.http("GET", f"/vaults/{vault}/keys/k")[0] == 404
    status, deleted = daemon.http("GET", f"/vaults/{vault}/deletedkeys")
    assert [k["kid"].rsplit("/", 1)[1] for k in deleted["value"]] == ["k"]
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/k/create", {"key_size": 2048})
    assert status == 409 and "deleted but recoverable" in body["error"]["message"]
    assert daemon.http("POST", f"/vaults/{vault}/deletedkeys/k/recover")[0] == 200
    assert daemon.http("POST", f"/vaults/{vault}/keys/k/wrapkey", {"value": b64u(b"v")})[0] == 200
    daemon.http("DELETE", f"/vaults/{vault}/keys/k")
    assert daemon.http("DELETE", f"/vaults/{vault}/deletedkeys/k")[0] == 204
    assert daemon.http("GET", f"/vaults/{vault}/deletedkeys/k")[0] == 404
    create_key(daemon, vault, "k")  # the name is free again after purge


def test_access_policies(daemon, vault):
    app = daemon.identity("disk-set-1")
    create_key(daemon, vault, "k")
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/k/wrapkey", {"value": b64u(b"v")}, as_=app)
    assert status == 403 and body["error"]["code"] == "Forbidden"
    assert body["error"]["message"] == (f"The user, group or application '{app.object_id}' does not "
                                        f"have keys wrapKey permission on key vault '{vault}'")
    status, body = daemon.http("PUT", f"/vaults/{vault}/accessPolicies/{app.object_id}",
                               {"permissions": {"keys": ["get", "wrapKey"]}})
    assert status == 200 and body["permissions"]["keys"] == ["get", "wrapKey"]
    status, w = daemon.http("POST", f"/vaults/{vault}/keys/k/wrapkey", {"value": b64u(b"v")}, as_=app)
    assert status == 200
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/k/unwrapkey", {"value": w["value"]}, as_=app)
    assert status == 403 and "unwrapKey permission" in body["error"]["message"]
    # a non-owner cannot change policies, even its own
    status, body = daemon.http("PUT", f"/vaults/{vault}/accessPolicies/{app.object_id}",
                               {"permissions": {"keys": ["all"]}}, as_=app)
    assert status == 403
    assert daemon.http("DELETE", f"/vaults/{vault}/accessPolicies/{app.object_id}")[0] == 204
    assert daemon.http("POST", f"/vaults/{vault}/keys/k/wrapkey", {"value": b64u(b"v")}, as_=app)[0] == 403


def test_identities_and_roles(daemon):
    platform = daemon.identity("platform", type_="servicePrincipal", roles=["platform"])
    status, body = daemon.http("POST", "/identities", {"displayName": "des-1", "type": "managedIdentity"},
                               as_=platform)
    assert status == 201 and body["clientSecret"] and body["roles"] == []
    status, body = daemon.http("POST", "/identities", {"displayName": "x", "type": "user"}, as_=platform)
    assert status == 403
    status, body = daemon.http("POST", "/identities", {"displayName": "x", "type": "managedIdentity",
                                                       "roles": ["admin"]}, as_=platform)
    assert status == 403
    mi = daemon.identity("plain")
    status, body = daemon.http("POST", "/identities", {"displayName": "x"}, as_=mi)
    assert status == 403 and "admin or platform role" in body["error"]["message"]


def test_vault_delete_recover_purge_and_purge_protection(daemon):
    for name, protect in (("vprot1", True), ("vplain1", False)):
        status, body = daemon.http("POST", "/vaults", {"name": name, "location": "l", "subscription": "s",
                                                       "softDeleteRetentionInDays": 7,
                                                       "enablePurgeProtection": protect})
        assert status == 201, body
        create_key(daemon, name, "k")
        assert daemon.http("DELETE", f"/vaults/{name}")[0] == 200
        assert daemon.http("GET", f"/vaults/{name}/keys/k")[0] == 404
        status, body = daemon.http("POST", "/vaults", {"name": name, "location": "l", "subscription": "s"})
        assert status == 409 and "deleted but recoverable" in body["error"]["message"]
        assert daemon.http("POST", f"/deletedvaults/{name}/recover")[0] == 200
        assert daemon.http("GET", f"/vaults/{name}/keys/k")[0] == 200  # keys come back with the vault
        daemon.http("DELETE", f"/vaults/{name}/keys/k")
        status, body = daemon.http("DELETE", f"/vaults/{name}/deletedkeys/k")
        if protect:
            assert status == 403 and body["error"]["innererror"]["code"] == "PurgeProtected"
            assert daemon.http("GET", f"/vaults/{name}/deletedkeys/k")[0] == 200  # nothing changed
        else:
            assert status == 204
        daemon.http("DELETE", f"/vaults/{name}")
        status, body = daemon.http("DELETE", f"/deletedvaults/{name}")
        assert status == (403 if protect else 204), body
    # purge protection can be turned on, never off
    status, _ = daemon.http("POST", "/vaults", {"name": "vtoggle", "location": "l", "subscription": "s"})
    assert daemon.http("PATCH", "/vaults/vtoggle", {"enablePurgeProtection": True})[1]["enablePurgeProtection"]
    status, body = daemon.http("PATCH", "/vaults/vtoggle", {"enablePurgeProtection": False})
    assert status == 400 and "cannot be disabled" in body["error"]["message"]
    status, body = daemon.http("PATCH", "/vaults/vtoggle", {"softDeleteRetentionInDays": 30})
    assert status == 409 and "fixed" in body["error"]["message"]


def test_openapi_lists_every_route(daemon):
    import json
    from pathlib import Path

    import keyservice
    status, doc = daemon.http("GET", "/openapi.json", token=None)
    assert status == 200
    assert doc == json.loads((Path(keyservice.__file__).parent / "openapi.json").read_text())
    from keyservice.api.app import make_app
    app = make_app(service=None)
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # implied by GET
        path = route.resource.canonical  # the generated document names path parameters as routed
        assert route.method.lower() in doc["paths"].get(path, {}), (route.method, path)


def test_service_audit_chain_is_admin_only(daemon):
    status, body = daemon.http("GET", "/audit")
    assert status == 200 and any(e["operation"] == "Token" for e in body["value"])
    assert daemon.http("GET", "/audit/verify")[1]["valid"] is True
    mi = daemon.identity("auditor")
    status, body = daemon.http("GET", "/audit", as_=mi)
    assert status == 403 and body["error"]["code"] == "Forbidden"


def test_event_stream_resumes_from_last_event_id(daemon, vault):
    import http.client
    import json
    create_key(daemon, vault, "k")
    status, _ = daemon.http("POST", f"/vaults/{vault}/keys/k/rotate")
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("GET", "/events", headers={"Authorization": f"Bearer {daemon.token(daemon.admin)}",
                                            "Last-Event-ID": "0"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    seen = []
    while not any(e["type"] == "key.rotated" and e["vault"] == vault for e in seen):
        line = resp.fp.readline().decode()
        if line.startswith("data:"):
            seen.append(json.loads(line[5:]))
    conn.close()
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))  # from the very first event


def test_zz_no_500_and_no_traceback_in_the_log(daemon):
    """Runs last in this module (file order): nothing above produced a 500 or a traceback."""
    log = daemon.stderr()
    assert "Traceback" not in log and " 500 " not in log and "ERROR" not in log
