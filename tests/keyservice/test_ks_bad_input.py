"""Bad input and attacks against the real daemon: each gets the right 4xx, an
error code and a message, never a 500, and nothing changes."""
import base64
import json
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyservice.sealing import derive
from keyservice.tokens import TokenSigner


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


@pytest.fixture
def keyed(daemon, vault):
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/k/create", {"key_size": 2048})
    assert status == 200, body
    return vault


def snapshot(daemon, vault):
    """Everything a bad request could have changed in a vault."""
    state = {}
    for path in (f"/vaults/{vault}", f"/vaults/{vault}/keys", f"/vaults/{vault}/deletedkeys",
                 f"/vaults/{vault}/keys/k/versions", f"/vaults/{vault}/keys/k", "/vaults",
                 "/deletedvaults"):
        state[path] = daemon.http("GET", path)
    return state


def check(response, status, code, words):
    got_status, body = response
    assert got_status == status, body
    assert body["error"]["code"] == code, body
    assert words.lower() in body["error"]["message"].lower(), body


CASES = [
    # (method, path template, raw body or JSON, status, code, words in the message)
    ("POST", "/vaults/{v}/keys/k/wrapkey", b"{not json", 400, "BadParameter", "not valid JSON"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", b"[1, 2]", 400, "BadParameter", "JSON object"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", b"[" * 100000 + b"]" * 100000, 400, "BadParameter", "JSON"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", b"", 400, "BadParameter", "JSON object body is required"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", b'{"value": "' + b"A" * (1024 * 1024 + 1) + b'"}',
     413, "RequestEntityTooLarge", "larger than the limit"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", {"value": 123}, 400, "BadParameter", "'value' must be of type string"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", {"alg": 7, "value": "AA"}, 400, "BadParameter", "'alg' must be"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", {}, 400, "BadParameter", "'value' is required"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", {"value": "a+b/"}, 400, "BadParameter", "not valid base64url"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", {"value": "A"}, 400, "BadParameter", "not valid base64url"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", {"value": b64u(b"x" * 191)}, 400, "BadParameter", "wraps at most 190 bytes"),
    ("POST", "/vaults/{v}/keys/k/wrapkey", {"alg": "RSA1_5", "value": "AA"}, 400, "BadParameter", "Unsupported algorithm"),
    ("POST", "/vaults/{v}/keys/k/unwrapkey", {"alg": "A256KW", "value": "AA"}, 400, "BadParameter", "Unsupported algorithm"),
    ("POST", "/vaults/{v}/keys/k/unwrapkey", {"value": b64u(b"x" * 10)}, 400, "BadParameter", "exactly 256 bytes"),
    ("POST", "/vaults/{v}/keys/k/unwrapkey", {"value": b64u(b"x" * 256)}, 400, "BadParameter", "could not be unwrapped"),
    ("POST", "/vaults/{v}/keys/k/create", {"key_size": "big"}, 400, "BadParameter", "'key_size' must be an integer"),
    ("POST", "/vaults/{v}/keys/k/create", {"key_size": 1024}, 400, "BadParameter", "key_size must be one of"),
    ("POST", "/vaults/{v}/keys/k/create", {"kty": "EC"}, 400, "BadParameter", "only RSA"),
    ("POST", "/vaults/{v}/keys/bad_name!/create", {}, 400, "BadParameter", "Invalid key name"),
    ("PATCH", "/vaults/{v}/keys/k", {"attributes": {"enabled": "yes"}}, 400, "BadParameter", "'attributes.enabled' must be of type boolean"),
    ("PATCH", "/vaults/{v}/keys/k", {"attributes": {"exp": "tomorrow"}}, 400, "BadParameter", "'attributes.exp' must be a number"),
    ("PATCH", "/vaults/{v}/keys/k", {"attributes": {"colour": 1}}, 400, "BadParameter", "'attributes.colour' is not a known field"),
    ("PATCH", "/vaults/{v}/keys/k", {"key_ops": ["sign"]}, 400, "BadParameter", "key_ops must be"),
    ("PATCH", "/vaults/{v}/keys/k/nothex", {"attributes": {"enabled": False}}, 400, "BadParameter", "Invalid key version"),
    ("PUT", "/vaults/{v}/keys/k", {"pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, 400, "BadParameter", "not an unencrypted PEM"),
    ("PUT", "/vaults/{v}/keys/k", {"key": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}, 400, "BadParameter", "lacks the private part"),
    ("PUT", "/vaults/{v}/accessPolicies/someone", {"permissions": {"keys": ["fly"]}}, 400, "BadParameter", "Unknown key permission"),
    ("PUT", "/vaults/{v}/accessPolicies/someone", {"permissions": "all"}, 400, "BadParameter", "'permissions' must be of type object"),
    ("GET", "/vaults/{v}/keys/nokey", None, 404, "KeyNotFound", "nokey"),
    ("POST", "/vaults/{v}/keys/nokey/wrapkey", {"value": "AA"}, 404, "KeyNotFound", "was not found"),
    ("GET", "/vaults/{v}/keys/k/" + "0" * 32, None, 404, "KeyNotFound", "was not found"),
    ("GET", "/vaults/novault/keys/k", None, 404, "VaultNotFound", "novault"),
    ("DELETE", "/vaults/{v}/deletedkeys/k", None, 404, "KeyNotFound", "deleted key"),
    ("POST", "/vaults/{v}/deletedkeys/k/recover", None, 404, "KeyNotFound", "deleted key"),
    ("GET", "/vaults/{v}/nothing", None, 404, "NotFound", "No such operation"),
    ("PUT", "/vaults/{v}", {}, 405, "MethodNotAllowed", "not allowed"),
    ("POST", "/vaults", {"name": "ok-name", "location": "l", "subscription": "s", "softDeleteRetentionInDays": 6}, 400, "BadParameter", "between 7 and 90"),
    ("POST", "/vaults", {"name": "ok-name", "location": "l", "subscription": "s", "softDeleteRetentionInDays": 91}, 400, "BadParameter", "between 7 and 90"),
    ("POST", "/vaults", {"name": "ok-name", "location": "l", "subscription": "s", "softDeleteRetentionInDays": "30"}, 400, "BadParameter", "must be an integer"),
    ("POST", "/vaults", {"name": "ok-name", "location": "l", "subscription": "s", "enablePurgeProtection": "yes"}, 400, "BadParameter", "must be of type boolean"),
    ("POST", "/vaults", {"name": "x", "location": "l", "subscription": "s"}, 400, "BadParameter", "Invalid vault name"),
    ("POST", "/vaults", {"name": "ok-name", "subscription": "s"}, 400, "BadParameter", "'location' is required"),
    ("POST", "/vaults", {"name": "{v}", "location": "l", "subscription": "s"}, 409, "Conflict", "already in use"),
    ("POST", "/identities", {"displayName": "x", "type": "robot"}, 400, "BadParameter", "type must be one of"),
    ("POST", "/identities", {"displayName": "x", "roles": ["god"]}, 400, "BadParameter", "roles must be"),
    ("POST", "/oauth2/token", {"grant_type": "password", "client_id": "a", "client_secret": "b"}, 400, "BadParameter", "client_credentials"),
    ("POST", "/oauth2/token", {"client_id": "a", "client_secret": "b"}, 401, "Unauthorized", "Invalid client"),
    ("GET", "/events?since=abc", None, 400, "BadParameter", "'since' must be an integer"),
]


@pytest.mark.parametrize("method,path,body,status,code,words", CASES,
                         ids=[f"{c[0]} {c[1][:40]} {c[3]} {c[5][:25]}" for c in CASES])
def test_bad_input(daemon, keyed, method, path, body, status, code, words):
    vault = keyed
    before = snapshot(daemon, vault)
    path = path.replace("{v}", vault)
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace("{v}", vault))
    raw = body if isinstance(body, bytes) else None
    check(daemon.http(method, path, None if raw is not None else body, raw=raw), status, code, words)
    assert snapshot(daemon, vault) == before


def test_tokens_missing_expired_forged_other_tenant(daemon, keyed):
    vault = keyed
    before = snapshot(daemon, vault)
    path = f"/vaults/{vault}/keys/k"
    check(daemon.http("DELETE", path, token=None), 401, "Unauthorized", "bearer token is required")
    check(daemon.http("DELETE", path, token="", headers={"Authorization": "Basic abc"}), 401,
          "Unauthorized", "bearer token is required")
    check(daemon.http("DELETE", path, token="not.a.jwt.at.all"), 401, "Unauthorized", "malformed")
    admin = daemon.admin
    # expired: signed with the real key (derived from the master key), but in the past
    signer = TokenSigner(derive((daemon.data_dir / "master-key").read_bytes(), "tokens/v1"), lifetime=60)
    old, _ = signer.issue(admin.object_id, admin.tenant_id, ["admin"], time.time() - 3600)
    check(daemon.http("DELETE", path, token=old), 401, "Unauthorized", "expired")
    # forged: a valid token's claims changed, or signed with another key, or alg none
    good = daemon.token(admin)
    h, p, s = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["oid"] = str(uuid.uuid4())
    forged = f"{h}.{b64u(json.dumps(claims).encode())}.{s}"
    check(daemon.http("DELETE", path, token=forged), 401, "Unauthorized", "signature is invalid")
    other, _ = TokenSigner(b"k" * 32).issue(admin.object_id, admin.tenant_id, ["admin"], time.time())
    check(daemon.http("DELETE", path, token=other), 401, "Unauthorized", "signature is invalid")
    none = b64u(b'{"alg":"none","typ":"JWT"}') + "." + p + "."
    check(daemon.http("DELETE", path, token=none), 401, "Unauthorized", "algorithm is not accepted")
    # other tenant: a genuine identity of another tenant, calling into this tenant's vault
    status, body = daemon.http("POST", "/identities", {"displayName": "foreign", "type": "servicePrincipal",
                                                       "tenantId": str(uuid.uuid4())})
    assert status == 201
    from keyservice.client import Credential
    foreign = Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])
    check(daemon.http("DELETE", path, as_=foreign), 401, "Unauthorized", "not the tenant of key vault")
    status, resp = daemon.http("DELETE", path, token=None)
    assert status == 401
    assert snapshot(daemon, vault) == before


def test_no_permission_changes_nothing(daemon, keyed):
    vault = keyed
    mi = daemon.identity("nobody")
    before = snapshot(daemon, vault)
    for method, path, body, perm in (
            ("DELETE", f"/vaults/{vault}/keys/k", None, "delete"),
            ("POST", f"/vaults/{vault}/keys/k/rotate", None, "rotate"),
            ("PATCH", f"/vaults/{vault}/keys/k", {"attributes": {"enabled": False}}, "update"),
            ("POST", f"/vaults/{vault}/keys/k2/create", {"key_size": 2048}, "create"),
            ("GET", f"/vaults/{vault}/keys", None, "list"),
            ("GET", f"/vaults/{vault}/keys/k", None, "get")):
        check(daemon.http(method, path, body, as_=mi), 403, "Forbidden", f"does not have keys {perm} permission")
    check(daemon.http("DELETE", f"/vaults/{vault}", as_=mi), 403, "Forbidden", "only its owner or an admin")
    assert snapshot(daemon, vault) == before


def test_soft_deleted_name_conflicts_until_recovered_or_purged(daemon, keyed):
    vault = keyed
    daemon.http("DELETE", f"/vaults/{vault}/keys/k")
    before = snapshot(daemon, vault)
    check(daemon.http("POST", f"/vaults/{vault}/keys/k/create", {"key_size": 2048}), 409, "Conflict",
          "deleted but recoverable")
    check(daemon.http("POST", f"/vaults/{vault}/keys/k/rotate"), 404, "KeyNotFound", "not found")
    assert snapshot(daemon, vault) == before


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["value", "alg", "key_size", "kty", "attributes", "key_ops", "enabled", "exp",
                         "nbf", "name", "location", "subscription", "softDeleteRetentionInDays",
                         "enablePurgeProtection", "permissions", "keys", "key", "pem", "n", "e",
                         "displayName", "type", "roles", "tenantId", "client_id", "client_secret"]),
        c, max_size=5),
    max_leaves=15)
_endpoints = st.sampled_from([
    ("POST", "/vaults/{v}/keys/k/wrapkey"), ("POST", "/vaults/{v}/keys/k/unwrapkey"),
    ("POST", "/vaults/{v}/keys/fz/create"), ("PUT", "/vaults/{v}/keys/fz"),
    ("PATCH", "/vaults/{v}/keys/k"), ("PUT", "/vaults/{v}/accessPolicies/fz"),
    ("POST", "/vaults"), ("PATCH", "/vaults/{v}"), ("POST", "/identities"), ("POST", "/oauth2/token")])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=_endpoints, body=_json)
def test_random_bodies_never_500(daemon, keyed_once, endpoint, body):
    method, path = endpoint
    status, resp = daemon.http(method, path.replace("{v}", keyed_once), raw=json.dumps(body).encode())
    assert status < 500, (endpoint, body, resp)
    if status >= 400:
        assert resp["error"]["code"] and resp["error"]["message"]


FORM = "application/x-www-form-urlencoded"
TENANT_TOKEN = "/4afe229b-4b6d-4c67-82d6-5e68a60a79fb/oauth2/v2.0/token"


@pytest.mark.parametrize("path", ["/oauth2/token", TENANT_TOKEN])
@pytest.mark.parametrize("raw, content_type", [
    (b"client_id=\xff&client_secret=\xfe&grant_type=client_credentials", FORM),
    (b"client_id=a&client_secret=b&grant_type=client_credentials", FORM + "; charset=no-such-codec"),
    (b"client_id=a&client_secret=b&grant_type=client_credentials", FORM + "; charset=utf-16"),
])
def test_token_form_that_does_not_decode_is_a_400(daemon, path, raw, content_type):
    """The token endpoints read forms too: a form that is not text in its charset (or
    names a charset there is no codec for) is the client's mistake, answered before any
    client is looked up, never a 500 (an unauthenticated caller reaches these)."""
    status, body = daemon.http("POST", path, raw=raw, token=None, headers={"Content-Type": content_type})
    assert status == 400, body
    message = body["error"]["message"] if path == "/oauth2/token" else body["error_description"]
    assert "form" in message and "\ufffd" not in message, body


@pytest.fixture(scope="module")
def keyed_once(daemon):
    status, _ = daemon.http("POST", "/vaults", {"name": "fuzzvault", "location": "l", "subscription": "s"})
    status, _ = daemon.http("POST", "/vaults/fuzzvault/keys/k/create", {"key_size": 2048})
    return "fuzzvault"


def test_zz_no_500_and_no_traceback_in_the_log(daemon):
    """Runs last in this module (file order): nothing above produced a 500 or a traceback."""
    log = daemon.stderr()
    assert "Traceback" not in log and " 500 " not in log and "ERROR" not in log
