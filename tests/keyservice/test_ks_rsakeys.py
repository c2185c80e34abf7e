"""RSA wrap/unwrap against an independent implementation: the OpenSSL command line."""
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from keyservice.domain import rsakeys
from keyservice.domain.errors import BadRequest


@pytest.fixture(scope="module")
def key():
    return rsakeys.generate(2048)


def openssl(args, data, tmp_path, private):
    pem = tmp_path / "key.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return subprocess.run(["openssl", "pkeyutl", *args, "-inkey", str(pem)], input=data,
                          capture_output=True, check=True).stdout


@pytest.mark.parametrize("alg,md", [("RSA-OAEP-256", "sha256"), ("RSA-OAEP", "sha1")])
def test_openssl_unwraps_ours_and_we_unwrap_openssls(key, tmp_path, alg, md):
    opts = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", f"rsa_oaep_md:{md}",
            "-pkeyopt", f"rsa_mgf1_md:{md}"]
    dek = bytes(range(64))
    ours = rsakeys.wrap(key.public_key(), alg, dek)
    assert openssl(["-decrypt", *opts], ours, tmp_path, key) == dek
    theirs = openssl(["-encrypt", *opts], dek, tmp_path, key)
    assert rsakeys.unwrap(key, alg, theirs) == dek


def test_limits(key):
    pub = key.public_key()
    assert rsakeys.max_wrap_length(pub, "RSA-OAEP-256") == 190
    assert rsakeys.max_wrap_length(pub, "RSA-OAEP") == 214
    rsakeys.wrap(pub, "RSA-OAEP-256", b"x" * 190)
    for alg, value in (("RSA-OAEP-256", b"x" * 191), ("RSA-OAEP-256", b""), ("RSA1_5", b"x")):
        with pytest.raises(BadRequest):
            rsakeys.wrap(pub, alg, value)
    with pytest.raises(BadRequest, match="could not be unwrapped"):
        rsakeys.unwrap(key, "RSA-OAEP-256", b"\x01" * 256)


@pytest.mark.parametrize("value,ok", [("AQID", b"\x01\x02\x03"), ("AQI=", b"\x01\x02"), ("-_8", b"\xfb\xff"),
                                      ("A", None), ("a+b/", None), ("a b", None), (5, None), ("Zm9v\n", None)])
def test_base64url_is_strict(value, ok):
    if ok is None:
        with pytest.raises(BadRequest):
            rsakeys.b64u_decode(value)
    else:
        assert rsakeys.b64u_decode(value) == ok


def test_import_checks():
    import cryptography.hazmat.primitives.asymmetric.ec as ec
    eckey = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(BadRequest, match="Only RSA"):
        rsakeys.load_pem(eckey)
    small = rsakeys.rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(BadRequest, match="not supported"):
        rsakeys.load_pem(small)
    with pytest.raises(BadRequest):
        rsakeys.load_jwk({"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB", "p": "Aw", "q": "Aw",
                          "dp": "AQ", "dq": "AQ", "qi": "AQ"})
