"""Bearer tokens: HS256 only, signature, expiry, not-before, shape."""
import base64
import json

import pytest

from keyservice.domain.errors import Unauthorized
from keyservice.tokens import TokenSigner

NOW = 1_800_000_000


def b64(d):
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def test_roundtrip_claims():
    s = TokenSigner(b"k" * 32, lifetime=600)
    token, exp = s.issue("oid", "tid", ["platform"], NOW)
    assert exp == NOW + 600
    caller = s.verify(token, NOW + 599)
    assert (caller.object_id, caller.tenant_id, caller.roles) == ("oid", "tid", ("platform",))


@pytest.mark.parametrize("when,words", [(NOW + 600, "expired"), (NOW - 60, "not yet valid")])
def test_time_bounds(when, words):
    s = TokenSigner(b"k" * 32, lifetime=600)
    token, _ = s.issue("oid", "tid", [], NOW)
    with pytest.raises(Unauthorized, match=words):
        s.verify(token, when)


def test_forgeries():
    s = TokenSigner(b"k" * 32)
    token, _ = s.issue("oid", "tid", [], NOW)
    h, p, sig = token.split(".")
    bad = [
        "", "a.b", "a.b.c.d", "!!.!!.!!",
        f"{h}.{b64({'oid': 'admin', 'tid': 'tid', 'exp': NOW + 99, 'roles': ['admin']})}.{sig}",
        f"{b64({'alg': 'none'})}.{p}.",
        f"{b64({'alg': 'HS512'})}.{p}.{sig}",
        TokenSigner(b"j" * 32).issue("oid", "tid", [], NOW)[0],
    ]
    for t in bad:
        with pytest.raises(Unauthorized):
            s.verify(t, NOW)


def test_malformed_claims_with_valid_signature():
    import hashlib
    import hmac
    key = b"k" * 32
    for claims in ([1], {"oid": 1, "tid": "t", "exp": NOW + 9}, {"oid": "o", "tid": "t", "exp": "soon"}):
        si = f"{b64({'alg': 'HS256'})}.{b64(claims)}"
        sig = base64.urlsafe_b64encode(hmac.new(key, si.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
        with pytest.raises(Unauthorized, match="malformed"):
            TokenSigner(key).verify(f"{si}.{sig}", NOW)


def _hand_signed(key: bytes, header: dict, claims: dict) -> str:
    """A token signed without the library: what the service issued before it used PyJWT
    (the same JWS), or a forgery by someone who holds the key."""
    import hashlib
    import hmac
    si = f"{b64(header)}.{b64(claims)}"
    sig = base64.urlsafe_b64encode(hmac.new(key, si.encode(), hashlib.sha256).digest()).rstrip(b"=")
    return f"{si}.{sig.decode()}"


def test_tokens_issued_before_the_library_still_verify():
    key = b"k" * 32
    claims = {"iss": "keyservice", "oid": "o", "sub": "o", "tid": "t", "roles": ["admin"], "gen": 2,
              "iat": NOW, "nbf": NOW, "exp": NOW + 600, "jti": "00" * 8}
    caller = TokenSigner(key).verify(_hand_signed(key, {"alg": "HS256", "typ": "JWT"}, claims), NOW)
    assert (caller.object_id, caller.roles, caller.generation) == ("o", ("admin",), 2)


def test_issuer_and_expiry_are_required():
    key = b"k" * 32
    base = {"iss": "keyservice", "oid": "o", "tid": "t", "exp": NOW + 600}
    with pytest.raises(Unauthorized, match="not issued by this service"):
        TokenSigner(key).verify(_hand_signed(key, {"alg": "HS256"}, dict(base, iss="elsewhere")), NOW)
    for missing in ("iss", "exp"):
        claims = {k: v for k, v in base.items() if k != missing}
        with pytest.raises(Unauthorized, match="malformed"):
            TokenSigner(key).verify(_hand_signed(key, {"alg": "HS256"}, claims), NOW)


def test_only_hs256_even_with_the_right_key():
    """A token whose header names another algorithm is refused before its signature is
    looked at: `alg` is pinned, never taken from the token."""
    import hashlib
    import hmac
    key = b"k" * 32
    claims = {"iss": "keyservice", "oid": "o", "tid": "t", "exp": NOW + 600}
    si = f"{b64({'alg': 'HS512'})}.{b64(claims)}"
    sig = base64.urlsafe_b64encode(hmac.new(key, si.encode(), hashlib.sha512).digest()).rstrip(b"=")
    with pytest.raises(Unauthorized, match="algorithm"):
        TokenSigner(key).verify(f"{si}.{sig.decode()}", NOW)
