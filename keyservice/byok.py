"""BYOK's key transfer blob, made where the key is, outside the key service.

    python -m keyservice.byok --kek KEK.json --key KEY.pem -o KEY.byok
    keyservice key import VAULT NAME --byok-file KEY.byok --kek-kid KID

KEK.json is `keyservice key show VAULT KEK` (or a PEM public key, with --kek-kid). The
blob is Key Vault's: CKM_RSA_AES_KEY_WRAP (PKCS#11 v2.40 section 2.1.21) of the key's
PKCS#8 DER, i.e. a fresh AES-256 key encrypted with RSA-OAEP (SHA-1 and MGF1-SHA-1, as
Key Vault's BYOK specifies) under the KEK, followed by the key wrapped with that AES key
(AES key wrap with padding, RFC 5649). The same with OpenSSL, in docs/keyservice-api.md.
"""
import argparse
import base64
import json
import os
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

ENC = "CKM_RSA_AES_KEY_WRAP"


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ciphertext(kek: rsa.RSAPublicKey, key: rsa.RSAPrivateKey) -> bytes:
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    aes = bytearray(os.urandom(32))
    try:
        wrapped_aes = kek.encrypt(bytes(aes), padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
        return wrapped_aes + aes_key_wrap_with_padding(bytes(aes), der)
    finally:
        aes[:] = bytes(len(aes))


def transfer_blob(data: bytes, kek_kid: str) -> dict:
    return {"schema_version": "1.0.0", "header": {"kid": kek_kid, "alg": "dir", "enc": ENC},
            "ciphertext": _b64u(data), "generator": "keyservice.byok"}


def transfer_blob_jwk(data: bytes, kek_kid: str) -> dict:
    """The import body's `key` from a .byok file (the JSON blob) or raw ciphertext."""
    try:
        blob = json.loads(data)
        if not isinstance(blob, dict) or "ciphertext" not in blob:
            raise ValueError("not a transfer blob")
        if blob.get("header", {}).get("kid") != kek_kid:
            raise SystemExit(f"the transfer blob was made for {blob.get('header', {}).get('kid')}, "
                             f"not for --kek-kid {kek_kid}")
    except (ValueError, UnicodeDecodeError):
        blob = transfer_blob(data, kek_kid)
    return {"kty": "RSA-HSM", "key_hsm": _b64u(json.dumps(blob).encode())}


def _load_kek(path: str, kid: str | None) -> tuple[rsa.RSAPublicKey, str]:
    raw = open(path, "rb").read()
    try:
        bundle = json.loads(raw)
        jwk = bundle.get("key", bundle)

        def num(name):
            s = jwk[name]
            return int.from_bytes(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)), "big")
        public = rsa.RSAPublicNumbers(num("e"), num("n")).public_key()
        return public, kid or jwk["kid"]
    except ValueError:
        pass
    pem_key = serialization.load_pem_public_key(raw)
    if not isinstance(pem_key, rsa.RSAPublicKey) or kid is None:
        raise SystemExit("--kek: an RSA public key PEM needs --kek-kid")
    return pem_key, kid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m keyservice.byok", description=__doc__.split("\n")[0])
    p.add_argument("--kek", required=True, help="`keyservice key show` JSON of the KEK, or its PEM")
    p.add_argument("--kek-kid", help="the KEK's versioned kid (from the JSON if not given)")
    p.add_argument("--key", required=True, help="the RSA private key to transfer, unencrypted PEM")
    p.add_argument("-o", "--output", required=True, help="the .byok file to write (0600)")
    args = p.parse_args(argv)
    kek, kid = _load_kek(args.kek, args.kek_kid)
    key = serialization.load_pem_private_key(open(args.key, "rb").read(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SystemExit("--key: only RSA private keys can be transferred")
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(transfer_blob(ciphertext(kek, key), kid), f)
    print(f"wrote {args.output} for KEK {kid}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
