"""RSA-HSM keys through the official Azure SDK for Python: `create_rsa_key(...,
hardware_protected=True)` against a key service whose keys live in a real SoftHSM2 token
(keyservice/hsm.py), BYOK with the SDK's `import_key`, and the same calls against a
service with no token configured."""
import json

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import JsonWebKey, KeyType
from azure.keyvault.keys.crypto import KeyWrapAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keyservice import byok
from tests.helpers.softhsm import make_token

from azure_sdk import AzureDaemon, vault_of

OAEP = {KeyWrapAlgorithm.rsa_oaep: padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None),
        KeyWrapAlgorithm.rsa_oaep_256: padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)}


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    return make_token(tmp_path_factory.mktemp("hsm"))


@pytest.fixture(scope="module")
def ks(tmp_path_factory, token):
    d = AzureDaemon(tmp_path_factory.mktemp("azhsm") / "data", token.serve_args(), env=token.env).start()
    yield d
    d.close()


@pytest.fixture
def client(ks):
    with ks.key_client(ks.new_vault(prefix="hsm")) as c:
        yield c


def _public(key) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(int.from_bytes(key.key.e, "big"), int.from_bytes(key.key.n, "big")).public_key()


def _in_token(token, key) -> bool:
    """Whether the token holds a private key with this key's modulus (made there, not imported)."""
    from pkcs11 import Attribute, ObjectClass
    with token.session() as s:
        return any(obj[Attribute.MODULUS] == key.key.n and obj[Attribute.EXTRACTABLE] is False
                   for obj in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))


@pytest.mark.parametrize("size", [2048, 3072, 4096])
def test_create_rsa_hsm_of_each_size(client, token, size):
    key = client.create_rsa_key("h", size=size, hardware_protected=True)
    assert key.key_type == KeyType.rsa_hsm and len(key.key.n) * 8 == size
    assert key.key.d is None and key.key.p is None
    assert _in_token(token, key)
    got = client.get_key("h")
    assert got.id == key.id and got.key_type == KeyType.rsa_hsm
    assert client.get_key("h", key.properties.version).key.n == key.key.n


def test_rsa_hsm_get_list_rotate_delete_recover(ks, client, token):
    first = client.create_rsa_key("h", size=2048, hardware_protected=True)
    client.create_rsa_key("soft", size=2048)
    rotated = client.rotate_key("h")
    assert rotated.key_type == KeyType.rsa_hsm and rotated.id != first.id
    assert _in_token(token, rotated)
    assert client.get_key("h").id == rotated.id
    assert client.get_key("h", first.properties.version).key_type == KeyType.rsa_hsm
    assert [p.name for p in client.list_properties_of_keys()] == ["h", "soft"]
    versions = [p.version for page in client.list_properties_of_key_versions("h", max_page_size=1).by_page()
                for p in page]
    assert sorted(versions) == sorted([first.properties.version, rotated.properties.version])
    deleted = client.begin_delete_key("h").result()
    assert deleted.key_type == KeyType.rsa_hsm and deleted.id == rotated.id
    with pytest.raises(ResourceNotFoundError):
        client.get_key("h")
    assert client.get_deleted_key("h").key_type == KeyType.rsa_hsm
    recovered = client.begin_recover_deleted_key("h").result()
    assert recovered.id == rotated.id and recovered.key_type == KeyType.rsa_hsm
    # The token objects survived the soft delete: the first version still unwraps.
    dek = bytes(range(32))
    wrapped = _public(first).encrypt(dek, OAEP[KeyWrapAlgorithm.rsa_oaep_256])
    assert ks.crypto_client(first.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek


@pytest.mark.parametrize("alg", [KeyWrapAlgorithm.rsa_oaep, KeyWrapAlgorithm.rsa_oaep_256])
def test_rsa_hsm_wrap_unwrap_through_cryptography_client(ks, client, alg):
    key = client.create_rsa_key("h", size=2048, hardware_protected=True)
    dek = bytes(range(32))
    # An identity with wrapKey/unwrapKey only: both operations run on the service.
    app = ks.app(vault_of(client), ["wrapKey", "unwrapKey"])
    crypto = ks.crypto_client(key.id, app)
    wrapped = crypto.wrap_key(alg, dek)
    assert wrapped.key_id == key.id and wrapped.algorithm == alg
    assert crypto.unwrap_key(alg, wrapped.encrypted_key).key == dek
    # Wrapped outside with the public key (an independent implementation), unwrapped in the token.
    assert crypto.unwrap_key(alg, _public(key).encrypt(dek, OAEP[alg])).key == dek
    # What the token unwraps with the other algorithm's padding is refused, not mangled.
    other = next(a for a in OAEP if a != alg)
    with pytest.raises(HttpResponseError) as e:
        crypto.unwrap_key(alg, _public(key).encrypt(dek, OAEP[other]))
    assert e.value.status_code == 400 and e.value.error.code == "BadParameter"


def test_rsa_hsm_keys_are_not_backed_up_nor_imported_in_clear(client):
    client.create_rsa_key("h", size=2048, hardware_protected=True)
    with pytest.raises(HttpResponseError) as e:
        client.backup_key("h")
    assert e.value.status_code == 403 and e.value.error.code == "Forbidden"
    assert e.value.error.innererror == {"code": "KeyNotBackupable"}
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = private.private_numbers()

    def b(i):
        return i.to_bytes((i.bit_length() + 7) // 8, "big")
    jwk = JsonWebKey(kty="RSA", n=b(nums.public_numbers.n), e=b(nums.public_numbers.e), d=b(nums.d),
                     p=b(nums.p), q=b(nums.q), dp=b(nums.dmp1), dq=b(nums.dmq1), qi=b(nums.iqmp))
    # The SDK's hardware_protected is Key Vault's "Hsm": a key that was in the clear is not one.
    with pytest.raises(HttpResponseError) as e:
        client.import_key("imported", jwk, hardware_protected=True)
    assert e.value.status_code == 400 and e.value.error.code == "BadParameter"
    assert "RSA-HSM" in e.value.error.message
    with pytest.raises(ResourceNotFoundError):
        client.get_key("imported")
    assert client.import_key("imported", jwk).key_type == KeyType.rsa


def test_byok_through_the_sdk(ks, client, token):
    """Key Vault's BYOK as the SDK sends it: a key-exchange key (RSA-HSM, key_ops import)
    made in the token, a key made outside and wrapped for it (keyservice.byok), imported
    with `JsonWebKey(kty=RSA-HSM, t=transfer blob)` and `hardware_protected=True`."""
    kek = client.create_rsa_key("kek", size=2048, hardware_protected=True, key_operations=["import"])
    assert kek.key_type == KeyType.rsa_hsm and kek.key_operations == ["import"]
    outside = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    blob = byok.transfer_blob(byok.ciphertext(_public(kek), outside), kek.id)
    imported = client.import_key("byok", JsonWebKey(kty=KeyType.rsa_hsm, t=json.dumps(blob).encode()),
                                 hardware_protected=True)
    assert imported.key_type == KeyType.rsa_hsm
    assert int.from_bytes(imported.key.n, "big") == outside.public_key().public_numbers().n
    assert _in_token(token, imported)
    dek = bytes(range(32))
    wrapped = outside.public_key().encrypt(dek, OAEP[KeyWrapAlgorithm.rsa_oaep_256])
    assert ks.crypto_client(imported.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek
    # The KEK does nothing but import.
    with pytest.raises(HttpResponseError) as e:
        ks.crypto_client(kek.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert e.value.status_code == 403 and e.value.error.code == "Forbidden"


def test_without_a_token_rsa_hsm_is_key_vaults_error(tmp_path):
    d = AzureDaemon(tmp_path / "data").start()
    try:
        with d.key_client(d.new_vault(prefix="nohsm")) as c:
            with pytest.raises(HttpResponseError) as e:
                c.create_rsa_key("h", size=2048, hardware_protected=True)
            assert e.value.status_code == 400 and e.value.error.code == "BadParameter"
            assert e.value.error.innererror == {"code": "HsmNotConfigured"}
            with pytest.raises(ResourceNotFoundError):
                c.get_key("h")
            assert c.create_rsa_key("h", size=2048).key_type == KeyType.rsa
    finally:
        d.close()
