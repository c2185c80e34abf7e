"""RSA-HSM keys in a PKCS#11 token: generation, unwrap and destruction run inside it.

The key service names a token (`--pkcs11-module`, `--pkcs11-token`) and logs in with a
PIN read from a credential file, never from argv or the environment (both are readable
by other processes through /proc). Private keys are made in the token with CKA_SENSITIVE
true and CKA_EXTRACTABLE false (PKCS#11 v2.40 section 4.9): no call returns their value,
so this process holds only a handle. The database keeps the reference (token label and
CKA_ID) and the public key.

unwrapKey: CKM_RSA_PKCS_OAEP with the algorithm's hash when the token offers it. A token
without OAEP over SHA-256 (SoftHSM 2.6 has only SHA-1) does the private-key operation as
CKM_RSA_X_509 in the token and OpenSSL's constant-time OAEP check (keyservice/oaep.py) here: what
leaves the token is then the padded message, which holds nothing but the value being
unwrapped; the private key stays in the token either way. wrapKey needs no secret: it is
done with the stored public key (rsakeys.wrap), as Key Vault's clients may do themselves.

One logged-in session, used under a lock: PKCS#11 does not let two threads use one
session at once, and the work is short (one RSA private operation).
"""
import hmac
import os
import secrets
import stat
import threading
from pathlib import Path

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.constants import DEFAULT
from pkcs11.mechanisms import MGF, GCMParams

from . import oaep
from .domain import rsakeys
from .domain.errors import BadRequest
from .domain.hsm_keys import HsmKeyMaterial
from .sealing import MasterKeyError

PIN_CREDENTIAL = "pkcs11-pin"  # the name under systemd's $CREDENTIALS_DIRECTORY
_HASHES = {"RSA-OAEP-256": (Mechanism.SHA256, MGF.SHA256, "sha256"),
           "RSA-OAEP": (Mechanism.SHA_1, MGF.SHA1, "sha1")}


class HsmConfigError(MasterKeyError):
    """The token cannot be used as configured; reported like a missing master key:
    the service refuses to start and says why."""


def read_pin(pin_file: str | None) -> str:
    """The PIN from `pin_file`, else from systemd's LoadCredential= (pkcs11-pin). The file
    must be the service user's and readable by nobody else, like the master key file."""
    if pin_file is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise HsmConfigError("--pkcs11-module needs a PIN: --pkcs11-pin-file, or a systemd "
                                 f"credential named {PIN_CREDENTIAL} (LoadCredential=)")
        pin_file = str(Path(creds) / PIN_CREDENTIAL)
    try:
        fd = os.open(pin_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise HsmConfigError(f"cannot read the PKCS#11 PIN file {pin_file}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or st.st_uid != os.geteuid():
            raise HsmConfigError(f"the PKCS#11 PIN file {pin_file} must be owned by this user and "
                                 "mode 0600 (chmod 600); it is readable by others")
        pin = f.read().strip()
    if not pin:
        raise HsmConfigError(f"the PKCS#11 PIN file {pin_file} is empty")
    return pin.decode()


class Pkcs11Token:
    """One token of one PKCS#11 module, logged in as its user."""

    def __init__(self, module: str, label: str, pin: str):
        try:
            self._lib = pkcs11.lib(module)
        except (RuntimeError, OSError) as e:  # not there, or not a PKCS#11 library
            raise HsmConfigError(f"cannot load the PKCS#11 module {module}: {e}") from None
        try:
            token = self._lib.get_token(token_label=label)
            self._session = token.open(user_pin=pin, rw=True)
        except p11.NoSuchToken:
            raise HsmConfigError(f"the PKCS#11 module has no token labelled {label!r}") from None
        except p11.PinIncorrect:
            raise HsmConfigError(f"the PIN for PKCS#11 token {label!r} is incorrect") from None
        except p11.PKCS11Error as e:
            raise HsmConfigError(f"cannot open PKCS#11 token {label!r}: {type(e).__name__}") from None
        self.label = label
        self._lock = threading.Lock()
        self._native_oaep: dict[str, bool] = {}  # learnt at the first unwrap of each algorithm

    def generate_rsa(self, size: int, kek: bool = False) -> HsmKeyMaterial:
        """A new key pair stored in the token; its CKA_ID is random, so references never
        collide, and says nothing about the vault or key (other tenants share the token).
        A key-exchange key (`kek`) may unwrap keys into the token and decrypt nothing, so
        no caller can use it to read what a transfer blob holds."""
        object_id = secrets.token_bytes(16)
        with self._lock:
            public, _ = self._session.generate_keypair(
                KeyType.RSA, rsakeys.check_size(size), id=object_id, label="keyservice",
                store=True,
                public_template={Attribute.ENCRYPT: True, Attribute.WRAP: False,
                                 Attribute.VERIFY: False},
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.DECRYPT: not kek, Attribute.UNWRAP: kek,
                                  Attribute.SIGN: False, Attribute.PRIVATE: True})
            n = int.from_bytes(public[Attribute.MODULUS], "big")
            e = int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big")
        return HsmKeyMaterial(self.label, object_id, rsa.RSAPublicNumbers(e, n).public_key(), kek)

    def import_transfer_blob(self, kek_id: bytes, kek_size: int, ciphertext: bytes) -> HsmKeyMaterial:
        """BYOK: CKM_RSA_AES_KEY_WRAP (PKCS#11 v2.40 section 2.1.21) done as its two steps,
        both in the token, as SoftHSM 2.6 lacks the combined mechanism: RSA-OAEP (SHA-1,
        as Key Vault's BYOK specifies) unwraps the ephemeral AES key into a session object,
        which unwraps the PKCS#8 private key (AES key wrap with padding, RFC 5649) into a
        token object, sensitive and not extractable. Neither key is ever in this process."""
        k = kek_size // 8
        if len(ciphertext) <= k + 8:
            raise _import_failed()
        object_id = secrets.token_bytes(16)
        with self._lock:
            kek = self._private(kek_id)
            ephemeral = None
            try:
                ephemeral = kek.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, ciphertext[:k], store=False,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None),
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.UNWRAP: True, **_NO_OTHER_USE})
                private = ephemeral.unwrap_key(
                    ObjectClass.PRIVATE_KEY, KeyType.RSA, ciphertext[k:], id=object_id,
                    label="keyservice", store=True, mechanism=Mechanism.AES_KEY_WRAP_PAD,
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.DECRYPT: True, Attribute.PRIVATE: True, **_NO_OTHER_USE})
            except p11.PKCS11Error:
                raise _import_failed() from None
            finally:
                if ephemeral is not None:
                    ephemeral.destroy()
            n = int.from_bytes(private[Attribute.MODULUS], "big")
            e = int.from_bytes(private[Attribute.PUBLIC_EXPONENT], "big")
        public = rsa.RSAPublicNumbers(e, n).public_key()
        if public.key_size not in rsakeys.SIZES:
            self.destroy(object_id)
            raise BadRequest(f"RSA key size {public.key_size} is not supported; use one of "
                             f"{', '.join(map(str, rsakeys.SIZES))}")
        return HsmKeyMaterial(self.label, object_id, public)

    def _private(self, object_id: bytes):
        try:
            return self._session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=object_id)
        except p11.NoSuchKey:
            raise HsmKeyMissing("The key's object is missing from the HSM token") from None

    def unwrap(self, object_id: bytes, size: int, alg: str, value: bytes) -> bytes:
        rsakeys.check_alg(alg)
        if len(value) != size // 8:
            raise BadRequest(f"value must be exactly {size // 8} bytes for a {size}-bit key, "
                             f"got {len(value)}")
        mech, mgf, hash_name = _HASHES[alg]
        with self._lock:
            key = self._private(object_id)
            if self._native_oaep.get(alg, True):
                try:
                    return bytes(key.decrypt(value, mechanism=Mechanism.RSA_PKCS_OAEP,
                                             mechanism_param=(mech, mgf, None)))
                except (p11.ArgumentsBad, p11.MechanismInvalid, p11.MechanismParamInvalid):
                    # A token without this OAEP, or a caller's bad value (some tokens say
                    # CKR_ARGUMENTS_BAD for both): a value of our own tells which, so no
                    # caller can switch every tenant's unwraps off the token's OAEP.
                    if self._oaep_works(object_id, alg):
                        raise _unwrap_failed() from None
                    self._native_oaep[alg] = False  # this token lacks it: decode here from now on
                except p11.PKCS11Error:
                    raise _unwrap_failed() from None
            try:
                em = bytes(key.decrypt(value, mechanism=Mechanism.RSA_X_509))
            except p11.PKCS11Error:
                raise _unwrap_failed() from None
        try:
            return oaep.decode(em, size // 8, hash_name)
        except oaep.OaepError:
            raise _unwrap_failed() from None

    def _oaep_works(self, object_id: bytes, alg: str) -> bool:
        """Whether the token's own OAEP for `alg` opens a value encrypted here to the key's
        public half (called with the lock held)."""
        mech, mgf, hash_name = _HASHES[alg]
        algorithm = hashes.SHA256() if hash_name == "sha256" else hashes.SHA1()
        probe = secrets.token_bytes(32)
        try:
            # The private object's public attributes: an imported (BYOK) key has no
            # public object of its own in the token.
            key = self._private(object_id)
            numbers = rsa.RSAPublicNumbers(int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big"),
                                           int.from_bytes(key[Attribute.MODULUS], "big"))
            value = numbers.public_key().encrypt(
                probe, padding.OAEP(padding.MGF1(algorithm), algorithm, None))
            out = key.decrypt(value, mechanism=Mechanism.RSA_PKCS_OAEP,
                              mechanism_param=(mech, mgf, None))
        except (p11.PKCS11Error, ValueError):  # cannot tell: as before, decode here
            return False
        return hmac.compare_digest(bytes(out), probe)

    def destroy(self, object_id: bytes) -> None:
        """Both halves of the pair; a half already gone is not an error (a purge retried)."""
        with self._lock:
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                try:
                    self._session.get_key(object_class=cls, id=object_id).destroy()
                except p11.NoSuchKey:
                    pass

    def has_key(self, object_id: bytes) -> bool:
        with self._lock:
            try:
                self._session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=object_id)
                return True
            except p11.NoSuchKey:
                return False

    # The master-key seal (hsm_seal.py): one AES-256 key in the token, found by its label.
    def seal_key_id(self, label: str, create: bool) -> bytes:
        with self._lock:
            try:
                return self._session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)[Attribute.ID]
            except p11.NoSuchKey:
                if not create:
                    raise HsmConfigError(f"PKCS#11 token {self.label!r} has no key labelled {label!r}: "
                                         "the master key of this data directory cannot be unsealed "
                                         "without it") from None
            except p11.MultipleObjectsReturned:
                raise HsmConfigError(f"PKCS#11 token {self.label!r} has several keys labelled "
                                     f"{label!r}; keep one") from None
            key_id = secrets.token_bytes(16)
            self._session.generate_key(
                KeyType.AES, 256, id=key_id, label=label, store=True,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.WRAP: False,
                          Attribute.UNWRAP: False, Attribute.PRIVATE: True})
            return key_id

    def seal_crypt(self, key_id: bytes, encrypt: bool, nonce: bytes, aad: bytes, data: bytes) -> bytes:
        """AES-256-GCM in the token (CKM_AES_GCM, 128-bit tag) with the key `key_id`."""
        params = GCMParams(nonce, aad, 128)
        with self._lock:
            try:
                key = self._session.get_key(object_class=ObjectClass.SECRET_KEY, id=key_id)
            except p11.NoSuchKey:
                raise HsmConfigError(f"PKCS#11 token {self.label!r} no longer has the key that "
                                     "sealed this data directory's master key") from None
            try:
                op = key.encrypt if encrypt else key.decrypt  # type: ignore[attr-defined]  # a SecretKey
                return bytes(op(data, mechanism=Mechanism.AES_GCM, mechanism_param=params))
            except p11.PKCS11Error as e:
                raise HsmConfigError(f"the HSM could not {'seal' if encrypt else 'unseal'} the "
                                     f"master key ({type(e).__name__})") from None

    def close(self) -> None:
        with self._lock:
            self._session.close()


class HsmKeyMissing(BadRequest):
    """A version whose token object was destroyed outside the service: its unwraps fail."""


# Attributes python-pkcs11 would set from default capabilities, left to the token instead.
_NO_OTHER_USE = {Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT, Attribute.VERIFY: DEFAULT,
                 Attribute.DERIVE: DEFAULT, Attribute.SIGN: DEFAULT}


def _import_failed() -> BadRequest:
    return BadRequest("The key transfer blob could not be unwrapped with this key-exchange key")


def _unwrap_failed() -> BadRequest:
    # One message for every failure, as rsakeys.unwrap: no oracle for a caller.
    return BadRequest("The value could not be unwrapped with this key and algorithm")
