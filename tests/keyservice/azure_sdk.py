"""Running the official Azure Key Vault SDKs against a real key service process.

Vault host names (`{vault}.vault.test`) are mapped to 127.0.0.1 in the client, as
Lowkey Vault's client does: `LoopbackAdapter` connects every request to the loopback
address and port while the URL, the Host header, SNI and the certificate check keep
the name. No DNS, no /etc/hosts. The server's certificate comes from `keyservice tls
init --host '*.vault.test'`, and the SDK trusts its CA through `connection_verify`.
"""
import importlib.util
import itertools
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from azure.core.pipeline.transport import RequestsTransport
from azure.identity import ClientSecretCredential
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient
from requests.adapters import HTTPAdapter

from keyservice.client import Credential

# This directory's conftest by path: a bare `import conftest` gets whichever conftest
# pytest imported first when several test directories run together.
_spec = importlib.util.spec_from_file_location("keyservice_tests_conftest",
                                               Path(__file__).with_name("conftest.py"))
assert _spec is not None and _spec.loader is not None
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
Daemon: Any = _conftest.Daemon

DOMAIN = "vault.test"
_names = itertools.count(1)


class LoopbackAdapter(HTTPAdapter):
    """Connect to 127.0.0.1 whatever the URL's host; the name stays in Host, SNI and
    the certificate's hostname check."""

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        name = host_params["host"]
        if name != "127.0.0.1":
            host_params = dict(host_params, host="127.0.0.1")
            pool_kwargs = dict(pool_kwargs, server_hostname=name, assert_hostname=name)
        return host_params, pool_kwargs

    def send(self, request, *args, **kwargs):
        request.headers["Host"] = urlsplit(request.url).netloc
        return super().send(request, *args, **kwargs)


def loopback_session() -> requests.Session:
    session = requests.Session()
    session.mount("https://", LoopbackAdapter())
    return session


def tls_dir(base: Path) -> Path:
    d = base / "tls"
    subprocess.run([sys.executable, "-m", "keyservice", "tls", "init", str(d),
                    "--host", f"*.{DOMAIN}", "--host", DOMAIN], check=True, capture_output=True)
    return d


class AzureDaemon(Daemon):
    """The key service over HTTPS with `--vault-domain vault.test`."""

    def __init__(self, data_dir: Path, extra_args=(), env=None):
        self.tls = tls_dir(Path(data_dir).parent)
        super().__init__(data_dir, ["--tls-dir", str(self.tls), "--vault-domain", DOMAIN, *extra_args],
                         env)
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca = str(self.tls / "ca-cert.pem")
        self.session = loopback_session()

    def http(self, method, path, body=None, *, as_=None, token="admin", raw=None, headers=None,
             url=None):
        """One request (to `url` or the service's base URL + path); (status, JSON or None)."""
        hdrs, data = self.request_parts(body, as_=as_, token=token, raw=raw, headers=headers)
        r = self.session.request(method, url or self.url + path, data=data, headers=hdrs,
                                 verify=self.ca, timeout=30)
        return r.status_code, (r.json() if r.content else None)

    def vault_url(self, vault: str) -> str:
        return f"https://{vault}.{DOMAIN}:{self.port}"

    def transport(self) -> RequestsTransport:
        return RequestsTransport(session=self.session, session_owner=False, connection_verify=self.ca)

    def credential(self, cred, **kwargs) -> ClientSecretCredential:
        return ClientSecretCredential(cred.tenant_id, cred.client_id, cred.client_secret,
                                      authority=self.url, disable_instance_discovery=True,
                                      transport=self.transport(), connection_verify=self.ca, **kwargs)

    def key_client(self, vault: str, cred=None, **kwargs) -> KeyClient:
        return KeyClient(self.vault_url(vault), self.credential(cred or self.admin),
                         transport=self.transport(), connection_verify=self.ca, **kwargs)

    def crypto_client(self, kid: str, cred=None) -> CryptographyClient:
        return CryptographyClient(kid, self.credential(cred or self.admin), transport=self.transport(),
                                  connection_verify=self.ca)

    def new_vault(self, purge_protection=False, prefix="sdk") -> str:
        """A fresh vault (7 days' retention) of the admin's tenant; its name."""
        name = f"{prefix}-{next(_names)}-{uuid.uuid4().hex[:6]}"
        status, body = self.http("POST", "/vaults", {"name": name, "location": "l", "subscription": "s",
                                                     "softDeleteRetentionInDays": 7,
                                                     "enablePurgeProtection": purge_protection})
        assert status == 201, body
        return name

    def app(self, vault: str, permissions) -> Credential:
        """A new service principal with `permissions` (key permissions) on `vault`."""
        status, body = self.http("POST", "/identities", {"displayName": "app", "type": "servicePrincipal"})
        assert status == 201, body
        cred = Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])
        status, body = self.http("PUT", f"/vaults/{vault}/accessPolicies/{cred.object_id}",
                                 {"permissions": {"keys": list(permissions)}})
        assert status == 200, body
        return cred


def vault_of(client) -> str:
    """The vault name of a KeyClient's host-form vault URL."""
    return client.vault_url.split("//")[1].split(".")[0]
