"""RSA key material: generation, import, JWK rendering, wrap and unwrap.

All primitives come from `cryptography` (OpenSSL). Algorithms, per RFC 7518
section 4.3 as Key Vault names them:
  RSA-OAEP-256  OAEP with SHA-256 and MGF1-SHA-256 (the default)
  RSA-OAEP      OAEP with SHA-1 and MGF1-SHA-1 (kept for compatibility;
                OAEP's security does not rest on SHA-1 collision resistance)
RSA1_5 is refused: PKCS#1 v1.5 encryption invites padding-oracle attacks.
"""
import base64

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .errors import BadRequest

_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

SIZES = (2048, 3072, 4096)
DEFAULT_SIZE = 3072
ALGORITHMS = {"RSA-OAEP-256": hashes.SHA256, "RSA-OAEP": hashes.SHA1}
DEFAULT_ALG = "RSA-OAEP-256"
# FIPS mode (`serve --fips`, daemonkit/fips.py), set once at start: the same sizes, and an
# imported key's public exponent at least 65537 (FIPS 186-5 A.1.1), refused in words that
# name FIPS mode, so an operator does not look for the limit elsewhere.
FIPS_MODE = False
FIPS_MIN_EXPONENT = 65537


def _unsupported(what: str) -> BadRequest:
    sizes = ", ".join(map(str, SIZES))
    if FIPS_MODE:
        return BadRequest(f"{what} is not approved in FIPS mode; use one of {sizes}")
    return BadRequest(f"{what} is not supported; use one of {sizes}")


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_decode(value, field: str = "value") -> bytes:
    """Strict base64url (RFC 4648 section 5, padding optional): anything else is refused."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a base64url string")
    if any(c not in _B64URL for c in value.rstrip("=")):
        raise BadRequest(f"{field} is not valid base64url")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except ValueError:
        raise BadRequest(f"{field} is not valid base64url") from None


def check_size(size) -> int:
    if isinstance(size, bool) or size not in SIZES:
        if FIPS_MODE:
            raise _unsupported(f"key_size {size!r}")
        raise BadRequest(f"key_size must be one of {', '.join(map(str, SIZES))}")
    return size


def generate(size: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=check_size(size))


def load_pem(pem: bytes) -> rsa.RSAPrivateKey:
    # OpenSSL's RSA consistency check costs seconds for large keys: parse without it
    # first, refuse unsupported sizes (an 8192-bit key) cheaply, then check.
    try:
        _check_imported(serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True))
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise BadRequest("The key is not an unencrypted PEM private key") from None
    return _check_imported(key)


def load_jwk(jwk) -> rsa.RSAPrivateKey:
    if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "RSA-HSM"):
        raise BadRequest("key must be a JWK object with kty RSA")
    fields = {}
    for name in ("n", "e", "d", "p", "q", "dp", "dq", "qi"):
        if name not in jwk:
            raise BadRequest(f"The JWK lacks the private part '{name}'")
        fields[name] = int.from_bytes(b64u_decode(jwk[name], f"key.{name}"), "big")
    if fields["n"].bit_length() not in SIZES:  # before the costly consistency check
        raise _unsupported(f"RSA key size {fields['n'].bit_length()}")
    try:
        public = rsa.RSAPublicNumbers(fields["e"], fields["n"])
        key = rsa.RSAPrivateNumbers(fields["p"], fields["q"], fields["d"], fields["dp"],
                                    fields["dq"], fields["qi"], public).private_key()
    except ValueError as e:
        raise BadRequest(f"The JWK is not a consistent RSA private key: {e}") from None
    return _check_imported(key)


def _check_imported(key) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadRequest("Only RSA private keys can be imported")
    if key.key_size not in SIZES:
        raise _unsupported(f"RSA key size {key.key_size}")
    if FIPS_MODE and key.public_key().public_numbers().e < FIPS_MIN_EXPONENT:
        raise BadRequest(f"an RSA public exponent below {FIPS_MIN_EXPONENT} is not approved in FIPS mode")
    return key


def private_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_der(der: bytes) -> rsa.RSAPrivateKey:
    """Load a key this service sealed itself. OpenSSL's RSA consistency check costs
    hundreds of milliseconds for a 3072-bit key; it ran when the key was generated or
    imported, and AES-GCM authenticated the blob since, so it is skipped here."""
    key = serialization.load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("a sealed key that is not RSA")
    return key


def public_der(key) -> bytes:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_der(der: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("a stored public key that is not RSA")
    return key


def public_jwk_fields(public: rsa.RSAPublicKey) -> dict:
    numbers = public.public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "n": b64u_encode(n), "e": b64u_encode(e)}


def _padding(alg) -> padding.OAEP:
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise BadRequest(f"Unsupported algorithm {alg!r}; supported: {', '.join(ALGORITHMS)}")
    h = ALGORITHMS[alg]
    return padding.OAEP(mgf=padding.MGF1(algorithm=h()), algorithm=h(), label=None)


def max_wrap_length(public: rsa.RSAPublicKey, alg: str) -> int:
    """RFC 8017 section 7.1.1: mLen <= k - 2*hLen - 2."""
    return public.key_size // 8 - 2 * ALGORITHMS[alg]().digest_size - 2


def check_alg(alg) -> str:
    _padding(alg)
    return alg


def wrap(public: rsa.RSAPublicKey, alg: str, value: bytes) -> bytes:
    pad = _padding(alg)
    if not value:
        raise BadRequest("value must not be empty")
    if len(value) > max_wrap_length(public, alg):
        raise BadRequest(f"value is {len(value)} bytes; {alg} with a {public.key_size}-bit key "
                         f"wraps at most {max_wrap_length(public, alg)} bytes")
    return public.encrypt(value, pad)


def unwrap(private: rsa.RSAPrivateKey, alg: str, value: bytes) -> bytes:
    pad = _padding(alg)
    if len(value) != private.key_size // 8:
        raise BadRequest(f"value must be exactly {private.key_size // 8} bytes for a "
                         f"{private.key_size}-bit key, got {len(value)}")
    try:
        return private.decrypt(value, pad)
    except ValueError:
        # One message for every failure: do not tell a caller which check failed.
        raise BadRequest("The value could not be unwrapped with this key and algorithm") from None
