"""`keyservice serve --seal pkcs11`: the master keyring sealed by an AES key in the HSM.

Like Vault's PKCS#11 seal: the master keys (sealing.py derives from each the row seal;
daemonkit's keyring, current key first) are stored in the data directory only
encrypted, AES-256-GCM in the token under an AES key that never leaves it
(`keyservice-seal`, sensitive, not extractable). At start the token decrypts them into
this process's memory, where they must be to seal rows. A copy of the data directory,
its backups included, is useless without the token and its PIN. This is another source
of the keyring, not another sealer: what is sealed with it is sealed as with a file.

The file, DATA_DIR/master-key.pkcs11 (0600), is JSON: format, the token's label, the
AES key's CKA_ID, and per master key the nonce and the ciphertext with its tag; the AAD
names the format. Format 1 (one key: `nonce`, `ciphertext`) is what the first release
wrote; format 2 (`keys`, a list, current first) is written by a rotation
(`rotate`, `retire`). It is made only for a new data directory; a database sealed by a
master key file is not moved into the HSM (refused, so that no database is ever
silently re-keyed).
"""
import json
from pathlib import Path

from daemonkit.fips import random_bytes
from daemonkit.keyring import Keyring, write_private_atomically

from .hsm import Pkcs11Token
from .sealing import MASTER_KEY_BYTES, MasterKeyError
from .store import DB_NAME

FILE = "master-key.pkcs11"
FORMAT = "keyservice/pkcs11-sealed-master/1"
FORMAT_KEYRING = "keyservice/pkcs11-sealed-master/2"
KEY_LABEL = "keyservice-seal"


def master_from_token(token: Pkcs11Token, data_dir: Path) -> Keyring:
    data_dir = Path(data_dir)
    path = data_dir / FILE
    if path.exists():
        return _unseal(token, path)
    if (data_dir / DB_NAME).exists():
        raise MasterKeyError(
            f"--seal pkcs11: {path} is missing, and {data_dir / DB_NAME} exists: this database is "
            "sealed by a master key file (start without --seal pkcs11) or its sealed master key "
            "was lost (restore it from the backup of the data directory)")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = Keyring((random_bytes(MASTER_KEY_BYTES),))
    _seal(token, path, keyring, token.seal_key_id(KEY_LABEL, create=True), FORMAT)
    return keyring


def rotate(token: Pkcs11Token, data_dir: Path) -> Keyring:
    """A new current master key, sealed in the token with the older ones after it."""
    path = Path(data_dir) / FILE
    keyring = _unseal(token, path).rotated()
    _seal(token, path, keyring, _key_id(path), FORMAT_KEYRING)
    return keyring


def retire(token: Pkcs11Token, data_dir: Path, status: dict) -> Keyring:
    """The sealed keyring without the keys `status` found retirable (daemonkit.rotation)."""
    if status["blockedBy"]:
        raise MasterKeyError("no key can be retired yet: " + "; ".join(status["blockedBy"]))
    path = Path(data_dir) / FILE
    keyring = _unseal(token, path)
    gone = set(status["retirable"])
    kept = keyring.retired(k for k in keyring.ids()[1:] if k.hex() not in gone)
    if kept != keyring:
        _seal(token, path, kept, _key_id(path), FORMAT_KEYRING)
    return kept


def _read(path: Path) -> tuple[dict, list[tuple[bytes, bytes]]]:
    try:
        sealed = json.loads(path.read_text())
        if sealed["format"] == FORMAT:
            entries = [sealed]
        elif sealed["format"] == FORMAT_KEYRING:
            entries = sealed["keys"]
        else:
            raise ValueError(sealed["format"])
        keys = [(bytes.fromhex(e["nonce"]), bytes.fromhex(e["ciphertext"])) for e in entries]
        bytes.fromhex(sealed["keyId"])
    except (ValueError, KeyError, TypeError):
        raise MasterKeyError(f"{path} is not a master key sealed by this service") from None
    if not keys:
        raise MasterKeyError(f"{path} holds no master key")
    return sealed, keys


def _key_id(path: Path) -> bytes:
    return bytes.fromhex(_read(path)[0]["keyId"])


def _unseal(token: Pkcs11Token, path: Path) -> Keyring:
    sealed, entries = _read(path)
    if sealed.get("token") != token.label:
        raise MasterKeyError(f"{path} was sealed in PKCS#11 token {sealed.get('token')!r}, "
                             f"not in {token.label!r} (--pkcs11-token)")
    key_id = bytes.fromhex(sealed["keyId"])
    keys = []
    for nonce, ciphertext in entries:
        master = token.seal_crypt(key_id, False, nonce, sealed["format"].encode(), ciphertext)
        if len(master) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"{path} did not unseal to a master key")
        keys.append(master)
    return Keyring(tuple(keys))


def _seal(token: Pkcs11Token, path: Path, keyring: Keyring, key_id: bytes, fmt: str) -> None:
    entries = []
    for master in keyring.keys:
        nonce = random_bytes(12)
        entries.append({"nonce": nonce.hex(),
                        "ciphertext": token.seal_crypt(key_id, True, nonce, fmt.encode(), master).hex()})
    doc: dict = {"format": fmt, "token": token.label, "keyId": key_id.hex()}
    if fmt == FORMAT:
        doc.update(entries[0])
    else:
        doc["keys"] = entries
    write_private_atomically(path, json.dumps(doc).encode())
