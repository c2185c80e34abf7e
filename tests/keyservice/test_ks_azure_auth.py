"""Key Vault's authentication and addressing on the wire: the 401 challenge, the v2.0
token endpoint, token audiences, vaults by host name (`serve --vault-domain`), trailing
slashes and `api-version`. A real daemon over HTTPS; the Azure SDK itself drives the
same service in test_ks_azure_sdk.py."""
import base64
import json
import re
import uuid

import pytest

from keyservice.client import Credential, parse_kid
from keyservice.domain.errors import BadRequest, Unauthorized
from keyservice.domain.service import KeyService
from keyservice.store import Store
from keyservice.tokens import TokenSigner

from azure_sdk import DOMAIN, AzureDaemon


@pytest.fixture(scope="module")
def ks(tmp_path_factory):
    d = AzureDaemon(tmp_path_factory.mktemp("azauth") / "data").start()
    status, body = d.http("POST", "/vaults", {"name": "vault1", "location": "l", "subscription": "s"})
    assert status == 201, body
    status, body = d.http("POST", "/vaults/vault1/keys/k1/create", {"key_size": 2048})
    assert status == 200, body
    yield d
    d.close()


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _challenge(header: str) -> dict:
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def _v2_token(ks, cred: Credential, scope: str, tenant: str | None = None):
    r = ks.session.post(f"{ks.url}/{tenant or cred.tenant_id}/oauth2/v2.0/token", verify=ks.ca,
                        data={"grant_type": "client_credentials", "client_id": cred.client_id,
                              "client_secret": cred.client_secret, "scope": scope}, timeout=30)
    return r.status_code, r.json()


def _new_tenant_admin(ks) -> Credential:
    status, body = ks.http("POST", "/identities", {"displayName": "other-admin", "type": "user",
                                                   "roles": ["admin"], "tenantId": str(uuid.uuid4())})
    assert status == 201, body
    return Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])


def test_unauthenticated_call_gets_key_vaults_challenge(ks):
    """What the SDKs' challenge policy parses: the token service with the vault's tenant,
    and a resource whose host is a parent domain of the vault's host (port included)."""
    for url in (ks.vault_url("vault1") + "/keys/k1/?api-version=7.4",
                ks.url + "/vaults/vault1/keys/k1"):
        r = ks.session.get(url, verify=ks.ca, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
        params = _challenge(r.headers["WWW-Authenticate"])
        assert params == {"authorization": f"{ks.url}/{ks.admin.tenant_id}",
                          "resource": f"https://{DOMAIN}:{ks.port}"}


def test_challenge_names_the_vaults_own_tenant(ks):
    other = _new_tenant_admin(ks)
    status, body = ks.http("POST", "/vaults", {"name": "vault-other", "location": "l",
                                               "subscription": "s"}, as_=other)
    assert status == 201, body
    r = ks.session.get(ks.vault_url("vault-other") + "/keys", verify=ks.ca, timeout=30)
    assert _challenge(r.headers["WWW-Authenticate"])["authorization"].endswith("/" + other.tenant_id)
    # A token of the home tenant at that vault: 401 again, naming the tenant to use.
    status, body = ks.http("GET", "", url=ks.vault_url("vault-other") + "/keys")
    assert status == 401


def test_openid_discovery_points_at_the_v2_token_endpoint(ks):
    tenant = ks.admin.tenant_id
    r = ks.session.get(f"{ks.url}/{tenant}/v2.0/.well-known/openid-configuration", verify=ks.ca,
                       timeout=30)
    assert r.status_code == 200
    doc = r.json()
    assert doc["token_endpoint"] == f"{ks.url}/{tenant}/oauth2/v2.0/token"
    assert doc["issuer"] == f"{ks.url}/{tenant}/v2.0" and "authorization_endpoint" in doc
    r = ks.session.get(f"{ks.url}/not-a-tenant/v2.0/.well-known/openid-configuration",
                       verify=ks.ca, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "invalid_tenant"


def test_discovery_names_a_key_set_that_is_public_and_empty(ks):
    """OIDC Discovery requires jwks_uri (MSAL for JavaScript refuses a document without
    it); the set is empty because only this service verifies its tokens."""
    tenant = ks.admin.tenant_id
    doc = ks.session.get(f"{ks.url}/{tenant}/v2.0/.well-known/openid-configuration", verify=ks.ca,
                         timeout=30).json()
    assert doc["jwks_uri"] == f"{ks.url}/{tenant}/discovery/v2.0/keys"
    r = ks.session.get(doc["jwks_uri"], verify=ks.ca, timeout=30)  # no token: it is public
    assert r.status_code == 200 and r.json() == {"keys": []}
    r = ks.session.get(f"{ks.url}/not-a-tenant/discovery/v2.0/keys", verify=ks.ca, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "invalid_tenant"


def test_v2_token_carries_the_resource_as_audience_and_works_by_host(ks):
    resource = f"https://{DOMAIN}:{ks.port}"
    status, body = _v2_token(ks, ks.admin, f"{resource}/.default")
    assert status == 200 and body["token_type"] == "Bearer" and body["expires_in"] > 0
    assert _claims(body["access_token"])["aud"] == resource
    status, got = ks.http("GET", "", token=body["access_token"],
                          url=ks.vault_url("vault1") + "/keys/k1/?api-version=7.6")
    assert status == 200 and got["key"]["kid"].startswith(ks.vault_url("vault1") + "/keys/k1/")


def test_v2_token_refusals_are_oauth_errors(ks):
    resource = f"https://{DOMAIN}:{ks.port}"
    status, body = _v2_token(ks, ks.admin, "https://vault.azure.net/.default")
    assert status == 400 and body["error"] == "invalid_scope"
    wrong = Credential(ks.admin.client_id, "not-the-secret", ks.admin.tenant_id, "")
    status, body = _v2_token(ks, wrong, f"{resource}/.default")
    assert status == 401 and body["error"] == "invalid_client"
    # The right secret at another tenant's endpoint is refused exactly like a wrong secret.
    status, body = _v2_token(ks, ks.admin, f"{resource}/.default", tenant=str(uuid.uuid4()))
    assert status == 401 and body["error"] == "invalid_client"
    assert body["error_description"] == "Invalid client id or client secret"


def test_tokens_without_audience_keep_working_in_both_forms(ks):
    token = ks.token(ks.admin)  # /oauth2/token, as the platform and the CLI get them
    assert "aud" not in _claims(token)
    assert ks.http("GET", "/vaults/vault1/keys/k1", token=token)[0] == 200
    assert ks.http("GET", "", token=token, url=ks.vault_url("vault1") + "/keys/k1")[0] == 200


def test_token_for_another_audience_is_refused(tmp_path):
    """The service only issues tokens for its own resources, so the case to guard is a
    token issued under another configuration (another domain or port) of the same
    service: its signature is good, its audience is not ours."""
    store = Store(tmp_path)
    try:
        svc = KeyService(store, TokenSigner(store.token_key), base_url="https://ks.test:8443",
                         audiences=("https://vault.test:8443", "https://ks.test:8443"))
        got = {}
        ident = svc.bootstrap_admin(lambda i, secret: got.update(secret=secret))
        ok, _, _ = svc.issue_token(ident.client_id, got["secret"], "https://vault.test:8443")
        assert svc.authenticate(ok).audience == "https://vault.test:8443"
        with pytest.raises(BadRequest):
            svc.issue_token(ident.client_id, got["secret"], "https://other.test")
        foreign, _ = svc.signer.issue(ident.object_id, ident.tenant_id, ident.roles, svc.clock(),
                                      ident.generation, "https://other.test:8443")
        with pytest.raises(Unauthorized, match="audience"):
            svc.authenticate(foreign)
    finally:
        store.close()


def test_kids_follow_the_form_of_the_request(ks):
    status, path_form = ks.http("GET", "/vaults/vault1/keys/k1")
    assert status == 200 and path_form["key"]["kid"].startswith(f"{ks.url}/vaults/vault1/keys/k1/")
    status, host_form = ks.http("GET", "", url=ks.vault_url("vault1") + "/keys/k1")
    assert status == 200
    version = path_form["key"]["kid"].rsplit("/", 1)[1]
    assert host_form["key"]["kid"] == f"{ks.vault_url('vault1')}/keys/k1/{version}"
    # The service's own client reads both forms (the CLI takes an SDK's kid).
    assert parse_kid(host_form["key"]["kid"]) == parse_kid(path_form["key"]["kid"]) == \
        ("vault1", "k1", version)
    status, wrapped = ks.http("POST", "", {"alg": "RSA-OAEP-256", "value": "AAAA"},
                              url=ks.vault_url("vault1") + "/keys/k1/wrapkey")
    assert status == 200 and wrapped["kid"] == host_form["key"]["kid"]


def test_trailing_slash_means_the_current_version(ks):
    for url in (ks.vault_url("vault1") + "/keys/k1/", ks.url + "/vaults/vault1/keys/k1/"):
        status, body = ks.http("GET", "", url=url)
        assert status == 200, body
        status, body = ks.http("PATCH", "", {"attributes": {"enabled": True}}, url=url)
        assert status == 200 and body["attributes"]["enabled"] is True


def test_host_names_that_name_no_vault(ks):
    status, body = ks.http("GET", "", url=ks.url + "/keys")  # 127.0.0.1 names no vault
    assert status == 404 and body["error"]["code"] == "VaultNotFound"
    status, body = ks.http("GET", "", url=ks.vault_url("nosuchvault") + "/keys")
    assert status == 404 and body["error"]["code"] == "VaultNotFound"


@pytest.mark.parametrize("version,status", [("7.4", 200), ("7.6", 200), ("2025-07-01", 200),
                                            ("7.3", 400), ("2016-10-01", 400), ("latest", 400)])
def test_api_version(ks, version, status):
    got, body = ks.http("GET", f"/vaults/vault1/keys/k1?api-version={version}")
    assert got == status, body
    if status == 400:
        assert body["error"]["code"] == "BadParameter" and version in body["error"]["message"]
