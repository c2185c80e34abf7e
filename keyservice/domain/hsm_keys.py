"""RSA-HSM key versions: what the domain knows of a key that lives in a PKCS#11 token.

The key service stores, in place of a sealed private key, a reference: the token's label
and the object's CKA_ID (keyservice/hsm.py makes and uses the object). The reference is
sealed like a private key (bound to its version by the AAD), so a row copied to another
version cannot point it at another key's object.
"""
import json
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import BadRequest

KTY_SOFTWARE = "RSA"
KTY_HSM = "RSA-HSM"
KTYS = (KTY_SOFTWARE, KTY_HSM)
_REFERENCE = b"keyservice/pkcs11-ref/1\n"  # cannot begin a DER private key (0x30)


@dataclass(frozen=True)
class HsmKeyMaterial:
    """A key pair just made in a token: what add_version stores for the new version."""
    token: str
    object_id: bytes
    public: rsa.RSAPublicKey

    @property
    def key_size(self) -> int:
        return self.public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self.public

    def reference(self) -> bytes:
        return _REFERENCE + json.dumps({"token": self.token, "id": self.object_id.hex()}).encode()


class Token(Protocol):
    label: str

    def generate_rsa(self, size: int) -> HsmKeyMaterial: ...
    def unwrap(self, object_id: bytes, size: int, alg: str, value: bytes) -> bytes: ...
    def destroy(self, object_id: bytes) -> None: ...


def is_reference(stored: bytes) -> bool:
    return stored.startswith(_REFERENCE)


def parse_reference(stored: bytes) -> tuple[str, bytes]:
    """(token label, CKA_ID) of a stored reference."""
    ref = json.loads(stored[len(_REFERENCE):])
    return ref["token"], bytes.fromhex(ref["id"])


def check_kty(kty) -> str:
    if kty not in KTYS:
        raise BadRequest(f"Unsupported key type {kty!r}; only RSA keys are supported "
                         f"({' or '.join(KTYS)})")
    return kty


def require_token(token: "Token | None", reference_token: str | None = None) -> Token:
    """The configured token, refused with a clear 400 when there is none (Key Vault refuses
    RSA-HSM in a vault without HSM backing the same way) or when a version names another."""
    if token is None:
        raise BadRequest("This key service has no HSM configured (keyservice serve "
                         "--pkcs11-module); RSA-HSM keys cannot be created or used here",
                         inner="HsmNotConfigured")
    if reference_token is not None and reference_token != token.label:
        raise BadRequest(f"This key version lives in HSM token {reference_token!r}, not in the "
                         f"configured token {token.label!r}", inner="HsmTokenMismatch")
    return token
