"""Proof that an RSA-HSM key's private parts never reach the key service: not its memory,
database, logs or answers.

The token's module runs in another process (`p11-kit server`; the key service loads
p11-kit-client.so), as a network or PCIe HSM's would: a module loaded into the key
service does its RSA in the key service's memory, and only the module's own care keeps
the key from showing there. The in-process case is scanned as well (fixture `module`).

To look for the private key we must know it, and a key made in the token is known to
nobody. So the test makes a key through the service, then puts a private key of its own
under the same CKA_ID in the token (sensitive, not extractable, as the service's was):
the service finds its key by that id and cannot tell. Then it unwraps with it through the
service and scans for every private component in big- and little-endian order (OpenSSL
and Botan keep bignums as little-endian words).
"""
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from test_ks_api import b64u, unb64u

from tests.helpers.platform import scan_for
from tests.helpers.softhsm import RemoteToken, make_token
from tests.keyservice.conftest import Daemon
from tests.platform.test_platform_revocation import _memory_hits

OAEP256 = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)


def _needles(key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    """48 bytes from the middle of each private component, in both byte orders: a slice
    of whole 64-bit words, so the little-endian form is exact in a bignum's limbs too."""
    nums = key.private_numbers()
    out = {}
    for name, value in (("d", nums.d), ("p", nums.p), ("q", nums.q), ("dp", nums.dmp1),
                        ("dq", nums.dmq1), ("qi", nums.iqmp)):
        be = value.to_bytes((value.bit_length() + 7) // 8, "big")
        mid = (len(be) // 2) & ~7
        out[f"{name} (big-endian)"] = be[mid - 24:mid + 24]
        out[f"{name} (little-endian)"] = be[::-1][mid - 24:mid + 24]
    return out


def _put_known_key(token, object_id: bytes, key: rsa.RSAPrivateKey) -> None:
    """Replace the private object `object_id` with `key`, with the attributes hsm.py gives."""
    from pkcs11 import Attribute, KeyType, ObjectClass
    nums = key.private_numbers()

    def b(x):
        return x.to_bytes((x.bit_length() + 7) // 8, "big")
    with token.session(rw=True) as s:
        s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=object_id).destroy()
        s.create_object({
            Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.ID: object_id, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.DECRYPT: True,
            Attribute.MODULUS: b(nums.public_numbers.n), Attribute.PUBLIC_EXPONENT: b(nums.public_numbers.e),
            Attribute.PRIVATE_EXPONENT: b(nums.d), Attribute.PRIME_1: b(nums.p),
            Attribute.PRIME_2: b(nums.q), Attribute.EXPONENT_1: b(nums.dmp1),
            Attribute.EXPONENT_2: b(nums.dmq1), Attribute.COEFFICIENT: b(nums.iqmp)})


@pytest.fixture(params=["p11-kit-server", "in-process"])
def module(request, tmp_path):
    """(token, serve args, environment). In-process too: SoftHSM keeps a sensitive key's
    attributes encrypted in its memory and wipes what it decrypted for an operation, so
    the scan passes there as well; that is SoftHSM's doing, where the separate process
    holds for any module."""
    token = make_token(tmp_path / "hsm")
    if request.param == "in-process":
        yield token, token.serve_args(), token.env
        return
    r = RemoteToken(token, tmp_path)
    yield token, r.serve_args(), {**token.env, **r.env}
    r.close()


def test_hsm_private_key_never_reaches_the_key_service(make_daemon, module, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("reading another process's memory needs root")
    token, args, env = module
    d = make_daemon(extra_args=args, env=env)
    assert d.http("POST", "/vaults", {"name": "iso", "location": "l", "subscription": "s"})[0] == 201
    status, made = d.http("POST", "/vaults/iso/keys/k/create", {"kty": "RSA-HSM", "key_size": 2048})
    assert status == 200, made
    from test_ks_hsm import object_id_of
    object_id = object_id_of(d, token, "iso", "k", made["key"]["kid"].rsplit("/", 1)[1])
    known = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _put_known_key(token, object_id, known)
    needles = _needles(known)

    responses = [made]
    dek = os.urandom(64)
    for alg, pad in (("RSA-OAEP-256", OAEP256),
                     ("RSA-OAEP", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))):
        wrapped = known.public_key().encrypt(dek, pad)
        status, body = Daemon.http(d, "POST", "/vaults/iso/keys/k/unwrapkey", {"alg": alg, "value": b64u(wrapped)})
        assert status == 200 and unb64u(body["value"]) == dek, body  # the token used our key
        responses.append(body)
    responses += [d.http("GET", "/vaults/iso/keys/k")[1], d.http("GET", "/vaults/iso/keys/k/versions")[1]]

    # The scan sees this process: the DEK it just unwrapped is in its memory.
    assert _memory_hits(d.proc.pid, {"dek": dek[:32]}), "the scan must see the key service's memory"
    assert _memory_hits(d.proc.pid, needles) == {}
    assert scan_for(needles, [d.data_dir], [d.stderr(), *map(str, responses)]) == []
    # The control: the same key imported as a software key and used once is found by the same
    # scan in the same process (OpenSSL's key object), so the scan can see a private key.
    pem = known.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
    assert d.http("PUT", "/vaults/iso/keys/soft", {"pem": pem})[0] == 200
    wrapped = known.public_key().encrypt(dek, OAEP256)
    assert d.http("POST", "/vaults/iso/keys/soft/unwrapkey", {"value": b64u(wrapped)})[0] == 200
    assert _memory_hits(d.proc.pid, needles), "the scan must find a private key that is there"
