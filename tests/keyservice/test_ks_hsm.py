"""RSA-HSM keys in a real SoftHSM2 token, through the real daemon (keyservice/hsm.py).

The lifecycle tests of test_ks_api.py run here again against a daemon whose keys are all
made in the token (`HsmDaemon` asks for kty RSA-HSM wherever they create a key): versions,
disable/expiry, soft delete, purge protection and policies behave as for software keys.
"""
import os
import stat

import pytest
import test_ks_api
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from test_ks_api import b64u, unb64u

from tests.helpers.softhsm import make_token
from tests.keyservice.conftest import Daemon

OAEP256 = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
OAEP1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)


class HsmDaemon(Daemon):
    """Every key create asks for RSA-HSM, so the software-key tests run on token keys."""

    def http(self, method, path, body=None, **kw):
        if method == "POST" and path.endswith("/create") and isinstance(body, dict):
            body = {**body, "kty": "RSA-HSM"}
        return super().http(method, path, body, **kw)


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    return make_token(tmp_path_factory.mktemp("hsm"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, token):
    d = HsmDaemon(tmp_path_factory.mktemp("ks") / "data", token.serve_args(), env=token.env).start()
    yield d
    d.close()


def public_of(bundle) -> rsa.RSAPublicKey:
    n = int.from_bytes(unb64u(bundle["key"]["n"]), "big")
    e = int.from_bytes(unb64u(bundle["key"]["e"]), "big")
    return rsa.RSAPublicNumbers(e, n).public_key()


def object_id_of(daemon, token, vault, name, version):
    """The CKA_ID the service gave a version, found by its public modulus in the token."""
    from pkcs11 import Attribute, ObjectClass
    status, bundle = daemon.http("GET", f"/vaults/{vault}/keys/{name}/{version}")
    n = unb64u(bundle["key"]["n"])
    with token.session() as s:
        for obj in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):  # an imported key has no public object
            if obj[Attribute.MODULUS] == n:
                return obj[Attribute.ID]
    return None


# The software-key lifecycle tests, on RSA-HSM keys.
test_rsa_oaep_sha1_and_sizes = test_ks_api.test_rsa_oaep_sha1_and_sizes
test_disable_expire_nbf_refuse_wrap = test_ks_api.test_disable_expire_nbf_refuse_wrap
test_delete_recover_purge_key = test_ks_api.test_delete_recover_purge_key
test_access_policies = test_ks_api.test_access_policies
test_vault_delete_recover_purge_and_purge_protection = \
    test_ks_api.test_vault_delete_recover_purge_and_purge_protection


def test_hsm_key_is_made_in_the_token_and_unwraps_there(daemon, vault, token):
    status, bundle = daemon.http("POST", f"/vaults/{vault}/keys/h1/create", {"kty": "RSA-HSM", "key_size": 2048})
    assert status == 200, bundle
    assert bundle["key"]["kty"] == "RSA-HSM" and "d" not in bundle["key"] and "p" not in bundle["key"]
    version = bundle["key"]["kid"].rsplit("/", 1)[1]
    # The token holds the private key, sensitive and not extractable.
    from pkcs11 import Attribute, ObjectClass
    object_id = object_id_of(daemon, token, vault, "h1", version)
    assert object_id
    with token.session() as s:
        private = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=object_id)
        assert private[Attribute.SENSITIVE] is True and private[Attribute.EXTRACTABLE] is False
    # Wrapped here with the public JWK (an independent implementation), unwrapped in the token,
    # with both algorithms (SoftHSM has OAEP over SHA-1 only: SHA-256 takes the raw path).
    dek = os.urandom(64)
    for alg, pad in (("RSA-OAEP-256", OAEP256), ("RSA-OAEP", OAEP1)):
        wrapped = public_of(bundle).encrypt(dek, pad)
        status, u = daemon.http("POST", f"/vaults/{vault}/keys/h1/unwrapkey", {"alg": alg, "value": b64u(wrapped)})
        assert status == 200 and unb64u(u["value"]) == dek, u
        status, w = daemon.http("POST", f"/vaults/{vault}/keys/h1/wrapkey", {"alg": alg, "value": b64u(dek)})
        status, u = daemon.http("POST", f"/vaults/{vault}/keys/h1/unwrapkey", {"alg": alg, "value": w["value"]})
        assert status == 200 and unb64u(u["value"]) == dek
    # A value wrapped with the other algorithm, a changed byte: one 400, no oracle.
    wrapped = bytearray(public_of(bundle).encrypt(dek, OAEP1))
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/h1/unwrapkey", {"alg": "RSA-OAEP-256", "value": b64u(bytes(wrapped))})
    assert status == 400 and "could not be unwrapped" in body["error"]["message"]
    wrapped[-1] ^= 1
    status, body2 = daemon.http("POST", f"/vaults/{vault}/keys/h1/unwrapkey", {"alg": "RSA-OAEP", "value": b64u(bytes(wrapped))})
    assert status == 400 and body2["error"]["message"] == body["error"]["message"]
    # Rotation makes the new version in the token too; the old one still unwraps.
    old = public_of(bundle).encrypt(dek, OAEP256)
    status, rotated = daemon.http("POST", f"/vaults/{vault}/keys/h1/rotate")
    assert status == 200 and rotated["key"]["kty"] == "RSA-HSM"
    assert object_id_of(daemon, token, vault, "h1", rotated["key"]["kid"].rsplit("/", 1)[1])
    status, u = daemon.http("POST", f"/vaults/{vault}/keys/h1/{version}/unwrapkey", {"value": b64u(old)})
    assert status == 200 and unb64u(u["value"]) == dek


def test_purge_destroys_the_token_objects(daemon, vault, token):
    from pkcs11 import Attribute, ObjectClass
    status, bundle = daemon.http("POST", f"/vaults/{vault}/keys/gone/create", {"key_size": 2048})
    version = bundle["key"]["kid"].rsplit("/", 1)[1]
    object_id = object_id_of(daemon, token, vault, "gone", version)
    assert daemon.http("DELETE", f"/vaults/{vault}/keys/gone")[0] == 200
    with token.session() as s:  # soft delete keeps the object: the key can be recovered
        assert list(s.get_objects({Attribute.ID: object_id, Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    assert daemon.http("DELETE", f"/vaults/{vault}/deletedkeys/gone")[0] == 204
    with token.session() as s:
        assert not list(s.get_objects({Attribute.ID: object_id}))


def test_refusals(daemon, vault):
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/h/create", {"key_size": 2048})
    assert status == 200
    status, body = daemon.http("POST", f"/vaults/{vault}/keys/h/backup")
    assert status == 403 and body["error"]["innererror"]["code"] == "KeyNotBackupable"
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = private.private_numbers()

    def i(x):
        return b64u(x.to_bytes((x.bit_length() + 7) // 8, "big"))
    jwk = {"kty": "RSA-HSM", "n": i(nums.public_numbers.n), "e": i(nums.public_numbers.e), "d": i(nums.d),
           "p": i(nums.p), "q": i(nums.q), "dp": i(nums.dmp1), "dq": i(nums.dmq1), "qi": i(nums.iqmp)}
    status, body = daemon.http("PUT", f"/vaults/{vault}/keys/imp", {"key": jwk})
    assert status == 400 and "cannot be imported as RSA-HSM" in body["error"]["message"]
    status, body = daemon.http("PUT", f"/vaults/{vault}/keys/imp", {"key": dict(jwk, kty="RSA"), "hsm": True})
    assert status == 400 and "cannot be imported as RSA-HSM" in body["error"]["message"]
    status, body = Daemon.http(daemon, "POST", f"/vaults/{vault}/keys/x/create", {"kty": "EC-HSM"})
    assert status == 400


def test_cli_creates_an_hsm_key(daemon, vault):
    r = daemon.cli("key", "create", vault, "viacli", "--kty", "RSA-HSM", "--size", "2048")
    assert '"RSA-HSM"' in r.stdout or "RSA-HSM" in r.stdout


def test_without_a_module_rsa_hsm_is_a_clear_400(make_daemon, tmp_path):
    d = make_daemon()
    status, _ = d.http("POST", "/vaults", {"name": "plain", "location": "l", "subscription": "s"})
    status, body = d.http("POST", "/vaults/plain/keys/h/create", {"kty": "RSA-HSM", "key_size": 2048})
    assert status == 400 and "no HSM configured" in body["error"]["message"]
    assert body["error"]["innererror"]["code"] == "HsmNotConfigured"


def test_pin_file_must_be_private_and_pin_never_in_argv(make_daemon, tmp_path):
    token = make_token(tmp_path / "hsm")
    os.chmod(token.pin_file, 0o644)
    d = make_daemon(extra_args=token.serve_args(), env=token.env, start=False)
    d.start(expect_ready=False)
    assert d.proc.wait(timeout=30) == 1
    assert "mode 0600" in d.stderr()
    os.chmod(token.pin_file, stat.S_IRUSR | stat.S_IWUSR)
    bad = tmp_path / "badpin"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"000000\n")
    os.close(fd)
    args = [a if a != str(token.pin_file) else str(bad) for a in token.serve_args()]
    d = make_daemon(extra_args=args, env=token.env, start=False)
    d.start(expect_ready=False)
    assert d.proc.wait(timeout=30) == 1
    assert "PIN" in d.stderr() and "000000" not in d.stderr()


def test_pin_from_systemd_credential(make_daemon, tmp_path):
    token = make_token(tmp_path / "hsm")
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    fd = os.open(creds / "pkcs11-pin", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, token.pin.encode())
    os.close(fd)
    d = make_daemon(extra_args=[*token.serve_args()[:4], "--master-key-file", str(tmp_path / "mk")],
                    env=dict(token.env, CREDENTIALS_DIRECTORY=str(creds)))
    status, _ = d.http("POST", "/vaults", {"name": "credv", "location": "l", "subscription": "s"})
    status, body = d.http("POST", "/vaults/credv/keys/h/create", {"kty": "RSA-HSM", "key_size": 2048})
    assert status == 200 and body["key"]["kty"] == "RSA-HSM"
    assert token.pin not in " ".join(open(f"/proc/{d.proc.pid}/cmdline").read().split("\0"))


test_zz_no_500_and_no_traceback_in_the_log = test_ks_api.test_zz_no_500_and_no_traceback_in_the_log
