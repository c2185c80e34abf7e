"""Key Vault's host-form key URLs (`https://{vault}.{domain}/keys/{name}`, what the Azure
SDKs print) are accepted for encryption sets when `serve --keyservice-vault-domain` names
the key service's domain; the platform keeps them in path form (model.canonical_key_url)."""

from __future__ import annotations

import pytest

from nbdserver.platform.errors import BadRequest
from nbdserver.platform.model import canonical_key_url
from tests.helpers.platform import CliFailed, pattern

KS = "https://keys.example:8443"


@pytest.mark.parametrize("given,kept", [
    ("https://v1.vault.example:8443/keys/k1", f"{KS}/vaults/v1/keys/k1"),
    ("https://v1.vault.example:8443/keys/k1/abc", f"{KS}/vaults/v1/keys/k1/abc"),
    ("https://v1.Vault.Example:8443/keys/k1/", f"{KS}/vaults/v1/keys/k1"),  # the domain's case
    (f"{KS}/vaults/v1/keys/k1", f"{KS}/vaults/v1/keys/k1"),  # path form: as given
    ("https://other.example:8443/keys/k1", "https://other.example:8443/keys/k1"),  # left to parse
])
def test_host_form_becomes_the_path_form(given, kept):
    assert canonical_key_url(given, KS, "vault.example") == kept


@pytest.mark.parametrize("given", [
    "https://v1.vault.example:9999/keys/k1",  # another port: another service
    "http://v1.vault.example:8443/keys/k1",  # another scheme
    "https://v1.vault.example:8443/secrets/k1",
    "https://v1.vault.example:8443/keys/k1/v/extra",
    "https://v1.vault.example:8443/keys/k1?api-version=7.4",
    "https://v1.vault.example:x/keys/k1",
    "https://Prod.vault.example:8443/keys/k1",  # would name the vault "prod": another one
])
def test_host_form_elsewhere_or_malformed_is_refused(given):
    with pytest.raises(BadRequest):
        canonical_key_url(given, KS, "vault.example")


def test_without_a_vault_domain_only_the_path_form_is_taken():
    url = "https://v1.vault.example:8443/keys/k1"
    assert canonical_key_url(url, KS, None) == url  # and KeyUrl.parse then refuses it


def test_an_encryption_set_on_a_host_form_url_serves_its_disk(make_stack):
    stack = make_stack(nbd_args=["--keyservice-vault-domain", "vault.test"])
    stack.keyservice("vault", "create", "hostform", "--location", "local", "--subscription", "sub1",
                     "--enable-purge-protection")
    kid = stack.keyservice("key", "create", "hostform", "k1", "--size", "2048")["key"]["kid"]
    version = kid.rsplit("/", 1)[1]
    port = stack.ks_url.rsplit(":", 1)[1]
    scheme = stack.ks_url.split("://")[0]
    host_form = f"{scheme}://hostform.vault.test:{port}/keys/k1/{version}"
    shown = stack.nbdserver("des", "create", "des-host", "--key-url", host_form)
    assert shown["keyUrl"] == stack.key_url("hostform", "k1", version), shown
    stack.grant("hostform", shown["identity"]["objectId"])
    stack.create_disk("hf1", "--size", "16M", "--des", "des-host")
    h = stack.connect("hf1")
    data = pattern(7, 1 << 16)
    h.pwrite(data, 0)
    assert h.pread(len(data), 0) == data
    h.shutdown()
    # Another port is another service: refused with the reason, nothing created.
    with pytest.raises(CliFailed) as refused:
        stack.nbdserver("des", "create", "des-else", "--key-url",
                        f"{scheme}://hostform.vault.test:1/keys/k1")
    assert "not on this platform's key service" in str(refused.value)


def test_a_latest_version_naming_another_key_is_refused():
    """Automatic rotation re-wraps under what `get` of the set's key answers: an answer
    naming another key (or no version) is refused, not followed. The key service cannot
    be made to answer so, hence a stand-in client."""
    import asyncio

    from nbdserver.platform import keys
    from nbdserver.platform.errors import KeyUnavailable

    class Answers:
        def __init__(self, kid):
            self.kid = kid

        async def get_key(self, url):
            return {"key": {"kid": self.kid}}

    url = f"{KS}/vaults/v1/keys/k1"
    assert asyncio.run(keys.latest_version(Answers(url + "/abc"), url)) == url + "/abc"
    for other in (f"{KS}/vaults/v2/keys/k1/abc", f"{KS}/vaults/v1/keys/k2/abc", url, "junk"):
        with pytest.raises(KeyUnavailable):
            asyncio.run(keys.latest_version(Answers(other), url))
