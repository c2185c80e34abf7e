"""Signed bearer tokens: compact JWS (RFC 7515) with HS256 (HMAC-SHA256).

The signing key is derived from the master key, so tokens survive a restart
and die with a master-key change. Claims: `oid` (object id), `tid` (tenant),
`roles`, `iat`, `nbf`, `exp` (RFC 7519), and `gen`, the identity's generation (the
service refuses a token whose generation is not the identity's current one). Only
HS256 is accepted: the header's `alg` is checked, never trusted (no "alg": "none", no
key confusion).

`aud` (RFC 7519 section 4.1.3) is set when the token was asked for a resource (the
OAuth 2.0 v2 endpoint's `scope`, or `resource` on /oauth2/token); the service then
refuses it unless the audience is one of its own. Tokens without `aud` are the
service's own clients' tokens, as before audiences existed, and stay valid.
"""
import base64
import hashlib
import hmac
import json
import secrets

from .domain.errors import Unauthorized
from .domain.identities import Caller

DEFAULT_LIFETIME = 3600
_HEADER = {"alg": "HS256", "typ": "JWT"}
_LEEWAY = 5  # seconds of clock skew tolerated on nbf only


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class TokenSigner:
    def __init__(self, key: bytes, lifetime: int = DEFAULT_LIFETIME, issuer: str = "keyservice"):
        self._key = key
        self.lifetime = lifetime
        self.issuer = issuer

    def _sign(self, signing_input: bytes) -> bytes:
        return hmac.new(self._key, signing_input, hashlib.sha256).digest()

    def issue(self, object_id: str, tenant_id: str, roles, now: float,
              generation: int = 0, audience: str | None = None) -> tuple[str, int]:
        exp = int(now) + self.lifetime
        claims = {"iss": self.issuer, "oid": object_id, "sub": object_id, "tid": tenant_id,
                  "roles": list(roles), "gen": generation, "iat": int(now), "nbf": int(now),
                  "exp": exp, "jti": secrets.token_hex(8)}
        if audience is not None:
            claims["aud"] = audience
        signing_input = (_b64(json.dumps(_HEADER).encode()) + "." +
                         _b64(json.dumps(claims, separators=(",", ":")).encode())).encode()
        return signing_input.decode() + "." + _b64(self._sign(signing_input)), exp

    def verify(self, token: str, now: float) -> Caller:
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthorized("The bearer token is malformed")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized("The bearer token is malformed") from None
        if not isinstance(header, dict) or header.get("alg") != "HS256":
            raise Unauthorized("The bearer token's algorithm is not accepted")
        if not hmac.compare_digest(self._sign(f"{parts[0]}.{parts[1]}".encode()), signature):
            raise Unauthorized("The bearer token's signature is invalid")
        if not isinstance(claims, dict):
            raise Unauthorized("The bearer token is malformed")
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(exp, int) or not isinstance(nbf, int):
            raise Unauthorized("The bearer token is malformed")
        if now >= exp:
            raise Unauthorized("The bearer token has expired")
        if now + _LEEWAY < nbf:
            raise Unauthorized("The bearer token is not yet valid")
        oid, tid, roles = claims.get("oid"), claims.get("tid"), claims.get("roles", [])
        gen, aud = claims.get("gen", 0), claims.get("aud")
        if not isinstance(oid, str) or not isinstance(tid, str) or not isinstance(roles, list) \
                or isinstance(gen, bool) or not isinstance(gen, int) \
                or not (aud is None or isinstance(aud, str)):
            raise Unauthorized("The bearer token is malformed")
        return Caller(object_id=oid, tenant_id=tid, roles=tuple(r for r in roles if isinstance(r, str)),
                      generation=gen, audience=aud)
