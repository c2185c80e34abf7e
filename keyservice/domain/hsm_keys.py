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
    kek: bool = False  # a key-exchange key: unwraps key transfer blobs only

    @property
    def key_size(self) -> int:
        return self.public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self.public

    def reference(self) -> bytes:
        return _REFERENCE + json.dumps({"token": self.token, "id": self.object_id.hex()}).encode()


class Token(Protocol):
    label: str

    def generate_rsa(self, size: int, kek: bool = False) -> HsmKeyMaterial: ...
    def import_transfer_blob(self, kek_id: bytes, kek_size: int, ciphertext: bytes) -> HsmKeyMaterial: ...
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


def check_kek_ops(kek: bool, key_ops: tuple[str, ...]) -> None:
    """A KEK's key_ops are ["import"], and only a KEK's: the token object was made for one
    use or the other (CKA_UNWRAP or CKA_DECRYPT), which no update can change."""
    if kek and key_ops != ("import",):
        raise BadRequest("A key-exchange key (key_ops import) can do nothing but import; its "
                         "key_ops cannot change")
    if not kek and "import" in key_ops:
        raise BadRequest("key_ops import is given to a key-exchange key when it is created "
                         "(kty RSA-HSM, key_ops [\"import\"]), never later")


BYOK_ENC = "CKM_RSA_AES_KEY_WRAP"


def parse_transfer_blob(jwk: dict) -> tuple[str, bytes]:
    """Key Vault's BYOK import: `{"kty": "RSA-HSM", "key_hsm": base64url(transfer blob)}`,
    the blob JSON `{"schema_version", "header": {"kid": KEK kid, "alg": "dir", "enc":
    "CKM_RSA_AES_KEY_WRAP"}, "ciphertext": base64url, "generator"}`. (KEK kid, ciphertext)."""
    from .rsakeys import b64u_decode
    if jwk.get("kty") != KTY_HSM:
        raise BadRequest("A key transfer blob (key_hsm) imports an RSA-HSM key: kty must be RSA-HSM")
    try:
        blob = json.loads(b64u_decode(jwk["key_hsm"], "key.key_hsm"))
        header = blob["header"]
        kid, enc = header["kid"], header.get("enc")
        ciphertext = b64u_decode(blob["ciphertext"], "ciphertext")
    except (ValueError, KeyError, TypeError):
        raise BadRequest("key.key_hsm is not a key transfer blob (base64url of its JSON with "
                         "header.kid and ciphertext)") from None
    if enc != BYOK_ENC or not isinstance(kid, str):
        raise BadRequest(f"The key transfer blob must say enc {BYOK_ENC} and name its KEK's kid")
    return kid, ciphertext


def parse_kek_kid(kid: str) -> tuple[str, str, str | None]:
    """(vault, name, version) of a kid in either form: .../vaults/V/keys/N[/VER] or
    https://V.domain/keys/N[/VER]."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(kid)
        path, host = parts.path.strip("/").split("/"), parts.hostname
    except ValueError:  # "http://[": not a URL
        raise BadRequest("The key transfer blob's kid is not a key identifier") from None
    if len(path) >= 4 and path[0] == "vaults" and path[2] == "keys":
        vault, rest = path[1], path[3:]
    elif len(path) >= 2 and path[0] == "keys" and host:
        vault, rest = host.split(".", 1)[0], path[1:]
    else:
        raise BadRequest("The key transfer blob's kid is not a key identifier")
    if not 1 <= len(rest) <= 2:
        raise BadRequest("The key transfer blob's kid is not a key identifier")
    return vault, rest[0], rest[1] if len(rest) == 2 else None


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
