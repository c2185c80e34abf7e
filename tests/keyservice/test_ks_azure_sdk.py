"""The official Azure SDK for Python (azure-keyvault-keys with azure-identity's
ClientSecretCredential) against a real key service process, unchanged: only the
client's configuration differs from Key Vault's (authority, vault URL, CA, and the
loopback mapping of vault host names in azure_sdk.py)."""
import base64
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.keyvault.keys import JsonWebKey, KeyClient, KeyReleasePolicy, KeyType
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keyservice.client import Credential

from azure_sdk import DOMAIN, AzureDaemon, vault_of


@pytest.fixture(scope="module")
def ks(tmp_path_factory):
    d = AzureDaemon(tmp_path_factory.mktemp("azsdk") / "data").start()
    yield d
    d.close()


def _vault(ks, purge_protection=False) -> str:
    return ks.new_vault(purge_protection)


@pytest.fixture
def client(ks):
    with ks.key_client(_vault(ks)) as c:
        yield c


def _crypto(ks, kid, cred=None) -> CryptographyClient:
    return ks.crypto_client(kid, cred)


def _identity(ks, vault, permissions) -> Credential:
    return ks.app(vault, permissions)


@pytest.mark.parametrize("size", [2048, 3072, 4096])
def test_create_rsa_and_get_latest_and_by_version(client, size):
    key = client.create_rsa_key("k", size=size)
    assert key.key_type == KeyType.rsa and key.id.startswith(client.vault_url + "/keys/k/")
    assert len(key.key.n) * 8 == size and key.properties.enabled is True
    assert key.properties.recovery_level == "CustomizedRecoverable+Purgeable"
    assert key.properties.recoverable_days == 7
    assert key.properties.created_on <= datetime.now(UTC)
    assert client.get_key("k").id == key.id
    assert client.get_key("k", key.properties.version).key.n == key.key.n


def test_list_keys_and_versions_across_pages(client):
    for name in ("a", "b", "c"):
        client.create_rsa_key(name, size=2048)
    client.rotate_key("a")
    client.rotate_key("a")
    pages = list(client.list_properties_of_keys(max_page_size=2).by_page())
    assert len(pages) == 2
    assert [p.name for page in pages for p in page] == ["a", "b", "c"]
    versions = list(client.list_properties_of_key_versions("a", max_page_size=2).by_page())
    assert [len(list(p)) for p in versions] == [2, 1]


def test_update_disable_enable_and_expiry(ks, client):
    key = client.create_rsa_key("k", size=2048)
    assert client.update_key_properties("k", enabled=False).properties.enabled is False
    crypto = _crypto(ks, key.id)
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"d" * 32).encrypted_key
    with pytest.raises(HttpResponseError) as e:
        crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert e.value.status_code == 403 and e.value.error.code == "Forbidden"
    assert "disabled" in e.value.error.message
    assert client.update_key_properties("k", key.properties.version, enabled=True).properties.enabled
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    updated = client.update_key_properties("k", expires_on=expires)
    assert updated.properties.expires_on == expires
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == b"d" * 32


def test_rotate_adds_a_current_version_of_the_same_size(client):
    first = client.create_rsa_key("k", size=2048)
    rotated = client.rotate_key("k")
    assert rotated.properties.version != first.properties.version and len(rotated.key.n) == 256
    assert client.get_key("k").id == rotated.id


def test_delete_get_deleted_recover(client):
    key = client.create_rsa_key("k", size=2048)
    deleted = client.begin_delete_key("k").result()
    assert deleted.recovery_id == f"{client.vault_url}/deletedkeys/k"
    assert deleted.scheduled_purge_date - deleted.deleted_date == timedelta(days=7)
    with pytest.raises(ResourceNotFoundError) as e:
        client.get_key("k")
    assert e.value.error.code == "KeyNotFound"
    assert client.get_deleted_key("k").id == key.id
    assert [d.name for d in client.list_deleted_keys()] == ["k"]
    poller = client.begin_recover_deleted_key("k")
    poller.wait()
    assert poller.result().id == key.id and client.get_key("k").id == key.id


def test_purge_without_and_with_purge_protection(ks, client):
    client.create_rsa_key("k", size=2048)
    client.begin_delete_key("k").wait()
    client.purge_deleted_key("k")
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_key("k")
    with ks.key_client(_vault(ks, purge_protection=True)) as protected:
        protected.create_rsa_key("k", size=2048)
        assert protected.get_key("k").properties.recovery_level == "CustomizedRecoverable"
        protected.begin_delete_key("k").wait()
        with pytest.raises(HttpResponseError) as e:
            protected.purge_deleted_key("k")
        assert e.value.status_code == 403 and e.value.error.code == "Forbidden"
        assert e.value.error.innererror == {"code": "PurgeProtected"}
        assert protected.get_deleted_key("k").name == "k"


@pytest.mark.parametrize("alg", [KeyWrapAlgorithm.rsa_oaep, KeyWrapAlgorithm.rsa_oaep_256])
def test_wrap_unwrap_on_the_service(ks, client, alg):
    """An identity with wrapKey/unwrapKey only: the SDK cannot read the public key, so
    it asks the service for both operations (with `get`, it would wrap locally)."""
    key = client.create_rsa_key("k", size=2048)
    app = _identity(ks, vault_of(client), ["wrapKey", "unwrapKey"])
    crypto = _crypto(ks, key.id, app)
    dek = bytes(range(32))
    wrapped = crypto.wrap_key(alg, dek)
    assert wrapped.key_id == key.id
    assert crypto.unwrap_key(alg, wrapped.encrypted_key).key == dek
    # And with `get` too (the SDK wraps with the public key, the service unwraps).
    local = _crypto(ks, key.id).wrap_key(alg, dek).encrypted_key
    assert crypto.unwrap_key(alg, local).key == dek


def test_import_a_jwk(ks, client):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = private.private_numbers()

    def b(i):
        return i.to_bytes((i.bit_length() + 7) // 8, "big")
    jwk = JsonWebKey(kty="RSA", n=b(nums.public_numbers.n), e=b(nums.public_numbers.e), d=b(nums.d),
                     p=b(nums.p), q=b(nums.q), dp=b(nums.dmp1), dq=b(nums.dmq1), qi=b(nums.iqmp),
                     key_ops=["wrapKey", "unwrapKey"])
    imported = client.import_key("imported", jwk)
    assert imported.key.n == b(nums.public_numbers.n)
    wrapped = private.public_key().encrypt(b"x" * 32, padding.OAEP(padding.MGF1(hashes.SHA256()),
                                                                   hashes.SHA256(), None))
    got = _crypto(ks, imported.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert got.key == b"x" * 32


def test_refusals_are_the_sdks_own_exceptions(ks, client):
    with pytest.raises(ResourceNotFoundError) as e:
        client.get_key("missing")
    assert e.value.error.code == "KeyNotFound"
    key = client.create_rsa_key("k", size=2048)
    vault = vault_of(client)
    reader = _identity(ks, vault, ["get"])
    with ks.key_client(vault, reader) as as_reader:
        assert as_reader.get_key("k").id == key.id
        with pytest.raises(HttpResponseError) as e:
            as_reader.create_rsa_key("other", size=2048)
    assert e.value.status_code == 403 and e.value.error.code == "Forbidden"
    assert "create permission" in e.value.error.message
    assert e.value.error.innererror == {"code": "AccessDenied"}
    with ks.key_client(vault, _identity(ks, vault, [])) as as_nobody:
        with pytest.raises(HttpResponseError) as e:
            as_nobody.get_key("k")
    assert e.value.status_code == 403 and e.value.error.innererror == {"code": "AccessDenied"}
    with pytest.raises(HttpResponseError) as e:
        _crypto(ks, key.id, _identity(ks, vault, ["wrapKey"])).unwrap_key(
            KeyWrapAlgorithm.rsa_oaep_256, b"\0" * 256)
    assert e.value.status_code == 403 and "unwrapKey permission" in e.value.error.message
    # A disabled key: its public part is still readable (Key Vault refuses `get` only on
    # disabled secrets), its private key does nothing.
    client.update_key_properties("k", enabled=False)
    assert client.get_key("k").properties.enabled is False
    with pytest.raises(HttpResponseError) as e:
        _crypto(ks, key.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"\0" * 256)
    assert e.value.status_code == 403 and e.value.error.code == "Forbidden"
    assert e.value.error.innererror == {"code": "KeyDisabled"}


def _stranger(ks) -> Credential:
    """An admin of a tenant of its own."""
    status, body = ks.http("POST", "/identities", {"displayName": "stranger", "type": "user",
                                                   "roles": ["admin"], "tenantId": str(uuid.uuid4())})
    assert status == 201, body
    return Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])


class _OwnTenantToken:
    """A credential that answers every challenge with a token of its own tenant, whatever
    tenant the challenge names: what a multi-tenant application's token would be."""

    def __init__(self, ks, cred: Credential):
        r = ks.session.post(f"{ks.url}/{cred.tenant_id}/oauth2/v2.0/token", verify=ks.ca, timeout=30,
                            data={"grant_type": "client_credentials", "client_id": cred.client_id,
                                  "client_secret": cred.client_secret,
                                  "scope": f"https://{DOMAIN}:{ks.port}/.default"})
        assert r.status_code == 200, r.text
        body = r.json()
        self.token = AccessToken(body["access_token"], int(time.time()) + body["expires_in"])
        self.tenants: list[str | None] = []

    def get_token(self, *scopes, tenant_id=None, **kwargs) -> AccessToken:
        self.tenants.append(tenant_id)
        return self.token


def test_another_tenants_vault_refuses_its_credentials_and_tokens(ks, client):
    client.create_rsa_key("k", size=2048)
    vault = vault_of(client)
    stranger = _stranger(ks)
    # The challenge names this vault's tenant; azure-identity will not ask for another
    # tenant's token unless told it may...
    with ks.key_client(vault, stranger) as as_stranger:
        with pytest.raises(ClientAuthenticationError):
            as_stranger.get_key("k")
    # ...and told it may, the token endpoint of this vault's tenant refuses the stranger.
    anywhere = ks.credential(stranger, additionally_allowed_tenants=["*"])
    with KeyClient(ks.vault_url(vault), anywhere, transport=ks.transport(),
                   connection_verify=ks.ca) as as_stranger:
        with pytest.raises(ClientAuthenticationError) as e:
            as_stranger.get_key("k")
    assert "Invalid client id or client secret" in str(e.value)
    # A good token of the stranger's own tenant, presented at this vault: Key Vault's 401.
    own = _OwnTenantToken(ks, stranger)
    with KeyClient(ks.vault_url(vault), own, transport=ks.transport(),
                   connection_verify=ks.ca) as as_stranger:
        for call in (lambda: as_stranger.get_key("k"), lambda: as_stranger.get_key("missing"),
                     lambda: list(as_stranger.list_properties_of_keys()),
                     lambda: as_stranger.create_rsa_key("theirs", size=2048)):
            with pytest.raises(ClientAuthenticationError) as e:
                call()
            assert e.value.status_code == 401 and e.value.error.code == "Unauthorized"
    assert vault_tenant(ks, vault) in own.tenants  # the SDK did follow the challenge
    assert [p.name for p in client.list_properties_of_keys()] == ["k"]


def vault_tenant(ks, vault) -> str:
    status, body = ks.http("GET", f"/vaults/{vault}")
    assert status == 200, body
    return body["tenantId"]


@pytest.mark.parametrize("version", ["7.4", "7.5", "7.6", "2025-07-01"])
def test_the_sdks_api_versions_from_7_4_work(ks, version):
    with ks.key_client(_vault(ks), api_version=version) as c:
        key = c.create_rsa_key("k", size=2048)
        assert c.get_key("k").id == key.id and [p.name for p in c.list_properties_of_keys()] == ["k"]
        wrapped = _crypto(ks, key.id).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)
        assert wrapped.key_id == key.id


@pytest.mark.parametrize("version", ["7.3", "7.0", "2016-10-01"])
def test_older_api_versions_are_refused_with_key_vaults_error(ks, version):
    vault = _vault(ks)
    with ks.key_client(vault, api_version=version) as c:
        with pytest.raises(HttpResponseError) as e:
            c.create_rsa_key("k", size=2048)
    assert e.value.status_code == 400 and e.value.error.code == "BadParameter"
    assert f"({version})" in e.value.error.message
    with ks.key_client(vault) as c:
        with pytest.raises(ResourceNotFoundError):  # nothing was made
            c.get_key("k")


def test_tags_are_refused_not_dropped(client):
    with pytest.raises(HttpResponseError) as e:
        client.create_rsa_key("k", size=2048, tags={"env": "test"})
    assert e.value.status_code == 400 and "tags" in e.value.error.message
    client.create_rsa_key("k", size=2048)
    with pytest.raises(HttpResponseError):
        client.update_key_properties("k", tags={"env": "test"})


def test_release_policy_and_exportable_keys_are_refused_not_dropped(client):
    """No private key leaves the service: a release policy or an exportable key is refused
    (400), never stored as if it held; `exportable=False`, what every bundle here says, is
    accepted."""
    policy = KeyReleasePolicy(b'{"version": "1.0.0", "anyOf": []}')
    for kwargs in ({"release_policy": policy}, {"exportable": True},
                   {"exportable": True, "release_policy": policy}):
        with pytest.raises(HttpResponseError) as e:
            client.create_rsa_key("k", size=2048, **kwargs)
        assert e.value.status_code == 400 and e.value.error.code == "BadParameter", kwargs
        assert "leaves this service" in e.value.error.message
    with pytest.raises(ResourceNotFoundError):
        client.get_key("k")
    key = client.create_rsa_key("k", size=2048, exportable=False)
    assert key.properties.exportable is False and key.properties.release_policy is None
    with pytest.raises(HttpResponseError) as e:
        client.update_key_properties("k", release_policy=policy)
    assert e.value.status_code == 400 and "release policies" in e.value.error.message
    assert client.get_key("k").properties.release_policy is None


def test_backup_and_restore_keep_every_version_and_its_attributes(ks, client):
    first = client.create_rsa_key("k", size=2048)
    dek = bytes(range(32))
    wrapped = _crypto(ks, first.id).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key
    client.rotate_key("k")
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    current = client.update_key_properties("k", expires_on=expires)
    client.update_key_properties("k", first.properties.version, enabled=False)
    blob = client.backup_key("k")
    client.begin_delete_key("k").wait()
    client.purge_deleted_key("k")
    with pytest.raises(ResourceNotFoundError):
        client.get_key("k")
    restored = client.restore_key_backup(blob)
    assert restored.id == current.id and restored.properties.expires_on == expires
    versions = {p.version: p for p in client.list_properties_of_key_versions("k")}
    assert set(versions) == {first.properties.version, current.properties.version}
    assert versions[first.properties.version].enabled is False
    # The private keys came back too: what the first version wrapped before the backup
    # unwraps once that version is enabled again.
    client.update_key_properties("k", first.properties.version, enabled=True)
    assert _crypto(ks, first.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek


def test_restore_into_another_vault_of_the_tenant_and_the_audit(ks, client):
    key = client.create_rsa_key("k", size=2048)
    blob = client.backup_key("k")
    other = _vault(ks)
    with ks.key_client(other) as there:
        restored = there.restore_key_backup(blob)
    assert restored.id == f"{ks.vault_url(other)}/keys/k/{key.properties.version}"
    assert restored.key.n == key.key.n
    _, body = ks.http("GET", f"/vaults/{vault_of(client)}/audit")
    assert any(e["operation"] == "KeyBackup" and e["key"] == "k" and e["status"] == 200
               for e in body["value"])
    _, body = ks.http("GET", f"/vaults/{other}/audit")
    assert any(e["operation"] == "KeyRestore" and e["kid"] == restored.id and e["status"] == 200
               for e in body["value"])


def test_restore_is_refused_while_the_name_is_taken(client):
    client.create_rsa_key("k", size=2048)
    blob = client.backup_key("k")
    with pytest.raises(ResourceExistsError) as e:
        client.restore_key_backup(blob)
    assert e.value.status_code == 409 and e.value.error.code == "Conflict"
    client.begin_delete_key("k").wait()
    with pytest.raises(ResourceExistsError):  # soft-deleted: recover or purge it first
        client.restore_key_backup(blob)


def test_backup_and_restore_need_their_own_permissions(ks, client):
    client.create_rsa_key("k", size=2048)
    vault = vault_of(client)
    everything_else = ["get", "list", "create", "import", "update", "delete", "recover", "purge",
                       "wrapKey", "unwrapKey", "rotate"]
    with ks.key_client(vault, _identity(ks, vault, everything_else)) as app:
        with pytest.raises(HttpResponseError) as e:
            app.backup_key("k")
        assert e.value.status_code == 403 and "backup permission" in e.value.error.message
        blob = client.backup_key("k")
        app.begin_delete_key("k").wait()
        app.purge_deleted_key("k")
        with pytest.raises(HttpResponseError) as e:
            app.restore_key_backup(blob)
        assert e.value.status_code == 403 and "restore permission" in e.value.error.message
    with ks.key_client(vault, _identity(ks, vault, ["restore"])) as restorer:
        assert restorer.restore_key_backup(blob).name == "k"


def test_another_tenants_vault_refuses_the_blob(ks, client):
    client.create_rsa_key("k", size=2048)
    blob = client.backup_key("k")
    status, body = ks.http("POST", "/identities", {"displayName": "other-tenant", "type": "user",
                                                   "roles": ["admin"], "tenantId": str(uuid.uuid4())})
    assert status == 201, body
    stranger = Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])
    theirs = f"theirs-{uuid.uuid4().hex[:6]}"
    status, body = ks.http("POST", "/vaults", {"name": theirs, "location": "l", "subscription": "s"},
                           as_=stranger)
    assert status == 201 and body["tenantId"] == stranger.tenant_id, body
    with ks.key_client(theirs, stranger) as as_stranger:
        with pytest.raises(HttpResponseError) as e:
            as_stranger.restore_key_backup(blob)
        assert e.value.status_code == 403 and e.value.error.code == "Forbidden"
        assert e.value.error.innererror == {"code": "BackupFromAnotherTenant"}
        with pytest.raises(ResourceNotFoundError):
            as_stranger.get_key("k")


def test_a_damaged_blob_is_a_clean_400(ks, client):
    client.create_rsa_key("k", size=2048)
    blob = client.backup_key("k")
    client.begin_delete_key("k").wait()
    client.purge_deleted_key("k")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    for bad in (bytes(flipped), blob[:-1], blob[:20], b"\x01" + bytes(64), b"x"):
        with pytest.raises(HttpResponseError) as e:
            client.restore_key_backup(bad)
        assert e.value.status_code == 400 and e.value.error.code == "BadParameter", bad[:8]
        assert "backup blob" in e.value.error.message
    vault = vault_of(client)
    for body in ({"value": "not base64!"}, {"value": 7}, {}):
        status, answer = ks.http("POST", "/keys/restore", body, url=f"{ks.vault_url(vault)}/keys/restore")
        assert status == 400 and answer["error"]["code"] == "BadParameter", (body, answer)
    with pytest.raises(ResourceNotFoundError):
        client.get_key("k")
    assert client.restore_key_backup(blob).name == "k"  # the intact blob still restores


def test_the_blob_holds_no_private_key_in_clear(client):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = private.private_numbers()

    def b(i):
        return i.to_bytes((i.bit_length() + 7) // 8, "big")
    client.import_key("imported", JsonWebKey(kty="RSA", n=b(nums.public_numbers.n),
                                             e=b(nums.public_numbers.e), d=b(nums.d), p=b(nums.p),
                                             q=b(nums.q), dp=b(nums.dmp1), dq=b(nums.dmq1),
                                             qi=b(nums.iqmp)))
    blob = client.backup_key("imported")
    der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    for secret in (b(nums.d), b(nums.p), b(nums.q), der):
        for form in (secret, base64.urlsafe_b64encode(secret).rstrip(b"="), base64.b64encode(secret)):
            assert form[:32] not in blob


def test_a_vault_that_does_not_exist_is_resource_not_found(ks):
    with ks.key_client(f"nosuch-{uuid.uuid4().hex[:8]}") as c:
        with pytest.raises(ResourceNotFoundError) as e:
            c.get_key("k")
        assert e.value.error.code == "VaultNotFound"
        with pytest.raises(ResourceNotFoundError):
            c.create_rsa_key("k", size=2048)
    vault = _vault(ks)
    with ks.key_client(vault) as c:
        c.create_rsa_key("k", size=2048)
        assert ks.http("DELETE", f"/vaults/{vault}")[0] == 200  # soft-deleted with its keys
        with pytest.raises(ResourceNotFoundError) as e:
            c.get_key("k")
        assert e.value.error.code == "VaultNotFound"
