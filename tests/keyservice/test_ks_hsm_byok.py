"""BYOK into a SoftHSM2 token, end to end (issue 18): a key-exchange key made in the
token, a key made outside and wrapped for it (by keyservice.byok, and independently by
the OpenSSL command line), imported and unwrapped only inside the token."""
import json
import os
import subprocess

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from test_ks_api import b64u, unb64u
from test_ks_hsm import object_id_of, public_of

from tests.helpers.softhsm import make_token
from tests.keyservice.conftest import Daemon

OAEP256 = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
VAULT = "byokv"


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    return make_token(tmp_path_factory.mktemp("hsm"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, token):
    d = Daemon(tmp_path_factory.mktemp("ks") / "data", token.serve_args(), env=token.env).start()
    assert d.http("POST", "/vaults", {"name": VAULT, "location": "l", "subscription": "s"})[0] == 201
    yield d
    d.close()


@pytest.fixture(scope="module")
def kek(daemon, tmp_path_factory):
    r = daemon.cli("key", "create", VAULT, "kek", "--kty", "RSA-HSM", "--ops", "import", "--size", "2048")
    bundle = json.loads(r.stdout)
    assert bundle["key"]["key_ops"] == ["import"] and bundle["key"]["kty"] == "RSA-HSM"
    path = tmp_path_factory.mktemp("kek") / "kek.json"
    path.write_text(r.stdout)
    return bundle, path


def outside_key(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return key, pem


def check_imported(daemon, token, name, key):
    status, bundle = daemon.http("GET", f"/vaults/{VAULT}/keys/{name}")
    assert status == 200 and bundle["key"]["kty"] == "RSA-HSM"
    assert public_of(bundle).public_numbers() == key.public_key().public_numbers()
    dek = os.urandom(32)
    status, u = daemon.http("POST", f"/vaults/{VAULT}/keys/{name}/unwrapkey",
                            {"value": b64u(key.public_key().encrypt(dek, OAEP256))})
    assert status == 200 and unb64u(u["value"]) == dek
    from pkcs11 import Attribute, ObjectClass
    object_id = object_id_of(daemon, token, VAULT, name, bundle["key"]["kid"].rsplit("/", 1)[1])
    with token.session() as s:
        private = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=object_id)
        assert private[Attribute.SENSITIVE] is True and private[Attribute.EXTRACTABLE] is False


def test_byok_with_the_tool(daemon, token, kek, tmp_path):
    bundle, kek_json = kek
    key, pem = outside_key(tmp_path)
    out = tmp_path / "key.byok"
    subprocess.run([os.sys.executable, "-m", "keyservice.byok", "--kek", str(kek_json), "--key", str(pem),
                    "-o", str(out)], check=True, capture_output=True, timeout=60)
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    daemon.cli("key", "import", VAULT, "byok1", "--byok-file", str(out), "--kek-kid", bundle["key"]["kid"])
    check_imported(daemon, token, "byok1", key)


def test_byok_with_openssl(daemon, token, kek, tmp_path):
    """The recipe of docs/keyservice-api.md, with OpenSSL's command line only."""
    bundle, _ = kek
    kek_pem = tmp_path / "kek.pem"
    kek_pem.write_bytes(public_of(bundle).public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    key, pem = outside_key(tmp_path)
    aes = os.urandom(32)
    (tmp_path / "aes.bin").write_bytes(aes)

    def openssl(*args):
        return subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path, timeout=60).stdout
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", str(pem), "-outform", "DER", "-out", "key.der")
    wrapped_aes = openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", "kek.pem", "-in", "aes.bin",
                          "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1",
                          "-pkeyopt", "rsa_mgf1_md:sha1")
    wrapped_key = openssl("enc", "-id-aes256-wrap-pad", "-K", aes.hex(), "-iv", "A65959A6",
                          "-in", "key.der")
    (tmp_path / "raw.byok").write_bytes(wrapped_aes + wrapped_key)
    daemon.cli("key", "import", VAULT, "byok2", "--byok-file", str(tmp_path / "raw.byok"),
               "--kek-kid", bundle["key"]["kid"])
    check_imported(daemon, token, "byok2", key)


def test_byok_refusals(daemon, kek, tmp_path):
    bundle, kek_json = kek
    kid = bundle["key"]["kid"]
    # The KEK does nothing but import, and stays so.
    status, body = daemon.http("POST", f"/vaults/{VAULT}/keys/kek/unwrapkey", {"value": b64u(b"x" * 256)})
    assert status == 403 and body["error"]["innererror"]["code"] == "KeyOperationNotAllowed"
    status, body = daemon.http("PATCH", f"/vaults/{VAULT}/keys/kek", {"key_ops": ["import", "unwrapKey"]})
    assert status == 400 and "key-exchange key" in body["error"]["message"]
    status, body = daemon.http("POST", f"/vaults/{VAULT}/keys/soft/create", {"kty": "RSA", "key_ops": ["import"], "key_size": 2048})
    assert status == 400
    status, plain = daemon.http("POST", f"/vaults/{VAULT}/keys/plainhsm/create", {"kty": "RSA-HSM", "key_size": 2048})
    status, body = daemon.http("PATCH", f"/vaults/{VAULT}/keys/plainhsm", {"key_ops": ["import"]})
    assert status == 400

    key, pem = outside_key(tmp_path)
    from keyservice.byok import ciphertext, transfer_blob_jwk
    data = ciphertext(public_of(bundle), key)

    def put(jwk):
        return daemon.http("PUT", f"/vaults/{VAULT}/keys/refused", {"key": jwk})
    # A changed byte in either part: one 400, nothing imported.
    for at in (10, len(data) - 10):
        bad = bytearray(data)
        bad[at] ^= 1
        status, body = put(transfer_blob_jwk(bytes(bad), kid))
        assert status == 400 and "could not be unwrapped" in body["error"]["message"], body
    # A blob for a key that is no KEK: its key_ops refuse import.
    status, body = put(transfer_blob_jwk(data, plain["key"]["kid"]))
    assert status == 403 and body["error"]["innererror"]["code"] == "KeyOperationNotAllowed"
    # A KEK of another vault.
    status, body = put(transfer_blob_jwk(data, kid.replace(f"/vaults/{VAULT}/", "/vaults/othervault/")))
    assert status == 400 and "must be in key vault" in body["error"]["message"]
    # A caller without import permission learns nothing about the blob.
    app = daemon.identity("byok-app")
    daemon.http("PUT", f"/vaults/{VAULT}/accessPolicies/{app.object_id}", {"permissions": {"keys": ["get"]}})
    status, body = Daemon.http(daemon, "PUT", f"/vaults/{VAULT}/keys/refused", {"key": transfer_blob_jwk(data, kid)}, as_=app)
    assert status == 403
    assert daemon.http("GET", f"/vaults/{VAULT}/keys/refused")[0] == 404
    # And the good blob goes in.
    status, body = put(transfer_blob_jwk(data, kid))
    assert status == 200 and body["key"]["kty"] == "RSA-HSM", body


def test_zz_no_500_and_no_traceback_in_the_log(daemon):
    log = daemon.stderr()
    assert "Traceback" not in log and " 500 " not in log
