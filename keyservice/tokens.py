"""Signed bearer tokens: compact JWS (RFC 7515) with HS256 (HMAC-SHA256).

The signing key is derived from the master key, so tokens survive a restart
and die with a master-key change. Claims: `oid` (object id), `tid` (tenant),
`roles`, `iat`, `nbf`, `exp` (RFC 7519), and `gen`, the identity's generation (the
service refuses a token whose generation is not the identity's current one).

`aud` (RFC 7519 section 4.1.3) is set when the token was asked for a resource (the
OAuth 2.0 v2 endpoint's `scope`, or `resource` on /oauth2/token); the service then
refuses it unless the audience is one of its own. Tokens without `aud` are the
service's own clients' tokens, as before audiences existed, and stay valid.

Encoding, the signature and the header's `alg` are PyJWT's (`algorithms` pinned to
HS256, so neither "none" nor a public-key algorithm fed our HMAC key is accepted), as
is the issuer check. Times are checked here against the service's clock (`now`, which
tests and the domain inject; PyJWT would read the wall clock). The audience is checked by
the service (`domain/directory.py`) because it is optional: PyJWT's check refuses a
token without `aud` once an audience is asked for.
"""
import jwt

from daemonkit.fips import random_bytes

from .domain.errors import Unauthorized
from .domain.identities import Caller

DEFAULT_LIFETIME = 3600
ALGORITHM = "HS256"
_LEEWAY = 5  # seconds of clock skew tolerated on nbf only
# Times are ours to check (above); everything else PyJWT decodes and verifies.
_OPTIONS = {"verify_signature": True, "verify_exp": False, "verify_nbf": False,
            "verify_iat": False, "verify_aud": False, "verify_iss": True,
            "require": ["exp", "iss"]}


class TokenSigner:
    def __init__(self, key: bytes, lifetime: int = DEFAULT_LIFETIME, issuer: str = "keyservice"):
        self._key = key
        self.lifetime = lifetime
        self.issuer = issuer

    def issue(self, object_id: str, tenant_id: str, roles, now: float,
              generation: int = 0, audience: str | None = None) -> tuple[str, int]:
        exp = int(now) + self.lifetime
        claims = {"iss": self.issuer, "oid": object_id, "sub": object_id, "tid": tenant_id,
                  "roles": list(roles), "gen": generation, "iat": int(now), "nbf": int(now),
                  "exp": exp, "jti": random_bytes(8).hex()}
        if audience is not None:
            claims["aud"] = audience
        # PyJWT 2.6's hints say str; an HMAC key is bytes (its later versions say so too).
        return jwt.encode(claims, self._key, algorithm=ALGORITHM), exp  # type: ignore[arg-type]

    def verify(self, token: str, now: float) -> Caller:
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM],  # type: ignore[arg-type]
                                issuer=self.issuer, options=_OPTIONS)
        except jwt.InvalidSignatureError:
            raise Unauthorized("The bearer token's signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("The bearer token's algorithm is not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("The bearer token was not issued by this service") from None
        except jwt.InvalidTokenError:  # DecodeError, MissingRequiredClaimError, ...
            raise Unauthorized("The bearer token is malformed") from None
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if isinstance(exp, bool) or not isinstance(exp, int) \
                or isinstance(nbf, bool) or not isinstance(nbf, int):
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
