"""`keyservice serve --seal pkcs11`: the master key sealed by an AES key in the HSM.

Like Vault's PKCS#11 seal: the 32-byte master key (sealing.py derives from it the row
seal, the token signing key, the audit key and the backup seal) is stored in the data
directory only encrypted, AES-256-GCM in the token under an AES key that never leaves
it (`keyservice-seal`, sensitive, not extractable). At start the token decrypts it into
this process's memory, where it must be to seal rows. A copy of the data directory, its
backups included, is useless without the token and its PIN.

The file, DATA_DIR/master-key.pkcs11 (0600), is JSON: format, the token's label, the
AES key's CKA_ID, the nonce and the ciphertext with its tag; the AAD names the format.
It is made only for a new data directory; a database sealed by a master key file is not
moved into the HSM (refused, so that no database is ever silently re-keyed).
"""
import json
import os
import secrets
from pathlib import Path

from .hsm import Pkcs11Token
from .sealing import MASTER_KEY_BYTES, MasterKeyError
from .store import DB_NAME

FILE = "master-key.pkcs11"
FORMAT = "keyservice/pkcs11-sealed-master/1"
KEY_LABEL = "keyservice-seal"


def master_from_token(token: Pkcs11Token, data_dir: Path) -> bytes:
    data_dir = Path(data_dir)
    path = data_dir / FILE
    if path.exists():
        try:
            sealed = json.loads(path.read_text())
            if sealed["format"] != FORMAT:
                raise ValueError(sealed["format"])
            key_id, nonce = bytes.fromhex(sealed["keyId"]), bytes.fromhex(sealed["nonce"])
            ciphertext = bytes.fromhex(sealed["ciphertext"])
        except (ValueError, KeyError, TypeError):
            raise MasterKeyError(f"{path} is not a master key sealed by this service") from None
        if sealed.get("token") != token.label:
            raise MasterKeyError(f"{path} was sealed in PKCS#11 token {sealed.get('token')!r}, "
                                 f"not in {token.label!r} (--pkcs11-token)")
        master = token.seal_crypt(key_id, False, nonce, FORMAT.encode(), ciphertext)
        if len(master) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"{path} did not unseal to a master key")
        return master
    if (data_dir / DB_NAME).exists():
        raise MasterKeyError(
            f"--seal pkcs11: {path} is missing, and {data_dir / DB_NAME} exists: this database is "
            "sealed by a master key file (start without --seal pkcs11) or its sealed master key "
            "was lost (restore it from the backup of the data directory)")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    master = secrets.token_bytes(MASTER_KEY_BYTES)
    key_id = token.seal_key_id(KEY_LABEL, create=True)
    nonce = secrets.token_bytes(12)
    ciphertext = token.seal_crypt(key_id, True, nonce, FORMAT.encode(), master)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": FORMAT, "token": token.label, "keyId": key_id.hex(),
                   "nonce": nonce.hex(), "ciphertext": ciphertext.hex()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return master
