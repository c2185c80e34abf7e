"""The official Azure Key Vault SDK for JavaScript (@azure/keyvault-keys, @azure/identity)
against a real key service process: a second SDK, to hold the service to Key Vault's
REST contract rather than to one client's habits. The node script (js/key_lifecycle.js)
runs the calls; this test checks what they returned. The packages come from the
committed js/package-lock.json (scripts/lib/bootstrap.sh runs `npm ci` where node is)."""
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from azure_sdk import DOMAIN, AzureDaemon

JS = Path(__file__).with_name("js")
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (the JavaScript SDK needs Node 20)"),
    pytest.mark.skipif(not (JS / "node_modules" / "@azure" / "keyvault-keys").is_dir(),
                       reason="the JavaScript SDK is not installed: run `npm ci` in tests/keyservice/js "
                              "(scripts/lib/bootstrap.sh does it when npm exists)"),
]


@pytest.fixture(scope="module")
def ks(tmp_path_factory):
    d = AzureDaemon(tmp_path_factory.mktemp("azjs") / "data").start()
    yield d
    d.close()


def _run(ks, vault: str, cred, wrapper) -> dict:
    assert NODE is not None  # the module is skipped without it
    cfg = {"authority": ks.url, "tenantId": cred.tenant_id, "clientId": cred.client_id,
           "clientSecret": cred.client_secret, "vaultUrl": ks.vault_url(vault), "domain": DOMAIN,
           "wrapper": {"clientId": wrapper.client_id, "clientSecret": wrapper.client_secret}}
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=ks.ca)
    env.pop("NODE_TLS_REJECT_UNAUTHORIZED", None)  # the certificate is checked, never waved through
    proc = subprocess.run([NODE, str(JS / "key_lifecycle.js"), json.dumps(cfg)], cwd=JS, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_javascript_sdk_key_lifecycle_and_refusals(ks):
    vault = f"js-{uuid.uuid4().hex[:8]}"
    status, body = ks.http("POST", "/vaults", {"name": vault, "location": "l", "subscription": "s",
                                               "softDeleteRetentionInDays": 7})
    assert status == 201, body
    wrapper = ks.identity("js-wrapper", "servicePrincipal")
    status, body = ks.http("PUT", f"/vaults/{vault}/accessPolicies/{wrapper.object_id}",
                           {"permissions": {"keys": ["wrapKey", "unwrapKey"]}})
    assert status == 200, body
    out = _run(ks, vault, ks.admin, wrapper)
    base = f"{ks.vault_url(vault)}/keys/js-key/"
    created = out["created"]
    assert created["id"].startswith(base) and created["kty"] == "RSA" and created["nBytes"] == 256
    assert created["enabled"] is True and created["recoveryLevel"] == "CustomizedRecoverable+Purgeable"
    assert out["latest"] == out["rotated"] != created["id"]
    assert out["byVersion"] == created["id"]
    assert out["names"] == ["js-key", "js-other"] and out["pages"] == 2  # maxPageSize 1: nextLink
    assert sorted(out["versions"]) == sorted([created["id"].rsplit("/", 1)[1],
                                              out["rotated"].rsplit("/", 1)[1]])
    for alg in ("RSA-OAEP", "RSA-OAEP-256"):
        assert out["wrap"][alg] == {"keyID": created["id"], "same": True}, alg
    assert out["deleted"] == {"recoveryId": f"{ks.vault_url(vault)}/deletedkeys/js-key",
                              "id": out["rotated"], "purgeDays": 7}
    assert out["deletedNames"] == ["js-key"]
    assert out["afterDelete"] == {"statusCode": 404, "code": "KeyNotFound", "inner": None}
    assert out["recovered"] == out["rotated"]
    # Refusals reach the SDK as RestError with Key Vault's codes.
    assert out["missing"] == {"statusCode": 404, "code": "KeyNotFound", "inner": None}
    assert out["disabledUnwrap"] == {"statusCode": 403, "code": "Forbidden", "inner": "KeyDisabled"}
    assert out["enabledAgain"] is True
    assert out["noPermission"] == {"statusCode": 403, "code": "Forbidden", "inner": "AccessDenied"}
    assert out["hsmWithoutToken"] == {"statusCode": 400, "code": "BadParameter",
                                      "inner": "HsmNotConfigured"}
    assert out["oldApiVersion"]["statusCode"] == 400 and out["oldApiVersion"]["code"] == "BadParameter"
    assert out["restored"]["after"] == out["restored"]["before"]
    assert out["restoreAgain"]["statusCode"] == 409 and out["restoreAgain"]["code"] == "Conflict"
    # Wrap and unwrap ran on the service (the wrapper may not read the public key).
    _, audit = ks.http("GET", f"/vaults/{vault}/audit")
    done = {e["operation"] for e in audit["value"]
            if e["status"] == 200 and e["caller"] == wrapper.object_id}
    assert done == {"KeyWrapVersion", "KeyUnwrapVersion"}, done  # the kid names the version
