"""Pure parts of RSA-HSM keys: OAEP decoding after the token's raw RSA (keyservice/oaep.py),
checked against what `cryptography` encrypts; transfer blobs and kids as callers may send them."""
import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from keyservice import oaep
from keyservice.domain import hsm_keys
from keyservice.domain.errors import BadRequest

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def raw_decrypt(c: bytes) -> bytes:
    """What CKM_RSA_X_509 returns: c^d mod n, k bytes."""
    nums = KEY.private_numbers()
    m = pow(int.from_bytes(c, "big"), nums.d, nums.public_numbers.n)
    return m.to_bytes(256, "big")


@pytest.mark.parametrize("h,digest", [(hashes.SHA256, "sha256"), (hashes.SHA1, "sha1")])
@pytest.mark.parametrize("length", [1, 32, 64, 190])
def test_oaep_decode_matches_openssl(h, digest, length):
    if h is hashes.SHA1 and length > 214 or h is hashes.SHA256 and length > 190:
        pytest.skip("longer than the key takes")
    message = bytes(range(length))
    c = KEY.public_key().encrypt(message, padding.OAEP(padding.MGF1(h()), h(), None))
    em = raw_decrypt(c)
    assert oaep.decode(em, 256, digest) == message
    assert oaep.decode(em.lstrip(b"\x00"), 256, digest) == message  # a token dropped zeros
    # The other hash, a changed byte anywhere, a non-zero first byte, a shifted value.
    other = "sha1" if digest == "sha256" else "sha256"
    bad = [(em, other), (em[:100] + bytes([em[100] ^ 1]) + em[101:], digest),
           (b"\x01" + em[1:], digest), (em[1:] + b"\x00", digest)]
    for value, d in bad:
        with pytest.raises(oaep.OaepError):
            oaep.decode(value, 256, d)


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def test_transfer_blob_and_kid_forms():
    blob = {"schema_version": "1.0.0", "header": {"kid": "https://kv/vaults/v1/keys/kek/" + "a" * 32,
                                                   "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
            "ciphertext": b64u(b"\x01\x02")}
    kid, data = hsm_keys.parse_transfer_blob({"kty": "RSA-HSM", "key_hsm": b64u(json.dumps(blob).encode())})
    assert data == b"\x01\x02" and hsm_keys.parse_kek_kid(kid) == ("v1", "kek", "a" * 32)
    assert hsm_keys.parse_kek_kid("https://v2.vault.example:8443/keys/kek") == ("v2", "kek", None)
    for bad in ("https://kv/vaults/v1/secrets/x", "http://[", "kek", "https://kv/vaults/v1/keys/a/b/c"):
        with pytest.raises(BadRequest):
            hsm_keys.parse_kek_kid(bad)
    with pytest.raises(BadRequest):  # kty must say RSA-HSM
        hsm_keys.parse_transfer_blob({"kty": "RSA", "key_hsm": b64u(json.dumps(blob).encode())})


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12))
def test_any_key_hsm_is_parsed_or_refused(value):
    """Whatever JSON a caller puts in the transfer blob: a result or BadRequest, no crash."""
    for key_hsm in (value, b64u(json.dumps(value).encode()),
                    b64u(json.dumps({"header": value, "ciphertext": "AA"}).encode()),
                    b64u(json.dumps({"header": {"kid": value, "enc": "CKM_RSA_AES_KEY_WRAP"},
                                     "ciphertext": "AA"}).encode())):
        try:
            kid, _ = hsm_keys.parse_transfer_blob({"kty": "RSA-HSM", "key_hsm": key_hsm})
            hsm_keys.parse_kek_kid(kid)
        except BadRequest:
            pass


def test_a_bad_value_does_not_switch_the_token_off_its_own_oaep(tmp_path):
    """Some tokens answer CKR_ARGUMENTS_BAD both for an OAEP they lack and for a bad value.
    One caller's garbage must not make the service decide the token lacks OAEP (which
    would send every tenant's unwraps to the raw RSA path, refused by HSMs that forbid
    it): a value of the service's own tells which. SoftHSM 2.6 has OAEP over SHA-1 only."""
    import os

    from keyservice.hsm import Pkcs11Token
    from tests.helpers.softhsm import make_token
    token = make_token(tmp_path / "hsm")
    token.session().close()  # this process's SoftHSM may predate the token: it looks again
    hsm = Pkcs11Token(token.module, token.label, token.pin)
    try:
        made = hsm.generate_rsa(2048)
        for alg in ("RSA-OAEP", "RSA-OAEP-256"):
            with pytest.raises(BadRequest):
                hsm.unwrap(made.object_id, 2048, alg, bytes(256))
        assert hsm._native_oaep.get("RSA-OAEP", True) is True  # SoftHSM has it: kept
        assert hsm._native_oaep.get("RSA-OAEP-256") is False  # it lacks this one: learnt
        dek = os.urandom(32)
        for alg, h in (("RSA-OAEP", hashes.SHA1), ("RSA-OAEP-256", hashes.SHA256)):
            c = made.public_key().encrypt(dek, padding.OAEP(padding.MGF1(h()), h(), None))
            assert hsm.unwrap(made.object_id, 2048, alg, c) == dek
    finally:
        hsm.close()
