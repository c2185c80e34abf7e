"""The seal over both daemons' secrets at rest: AES-256-GCM under a keyring of master keys.

Like Vault's barrier (vault/barrier_aes_gcm.go), a sealed blob says how to open it:

    0x02 || key id (4 bytes, daemonkit/keyring.py) || nonce (12 bytes) || ciphertext+tag

The associated data is the record the blob belongs to (`aad`, e.g. "des:NAME"), so a
blob copied onto another record does not open. New blobs are sealed under the keyring's
current key; a blob under an older key of the keyring still opens, and `needs_reseal`
says which blobs a rotation has yet to move. A blob whose key id is in no key of the
keyring is refused by name: the keyring is not the one the state was sealed under.

Format 0x01 (nonce || ciphertext+tag, no key id) is what both daemons wrote before
rotation existed; it opens under whichever key of the keyring sealed it (GCM's tag says
which), and is re-sealed as 0x02 like any blob under a non-current key.

`reload` (the keyring file read again) is for several instances of a daemon on one
state: one restarted after a rotation re-seals under the new key while the others still
run on the keyring they started with; a blob naming a key they lack makes them read
their keyring once more, and the key is then theirs for opening (they keep sealing under
their current key until they restart, so they never seal under a key another instance
may not have yet).

`subkey` is each daemon's own step from a master key to the AES key, kept from before:
the platform used the master key as it is, the key service an HKDF-derived key. Random
96-bit nonces: NIST SP 800-38D's bound of 2^32 messages per key is far above the number
of records either daemon seals under one master key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .fips import random_bytes
from .keyring import KEY_ID_BYTES, Keyring, MasterKeyError, key_id

V1 = 0x01
V2 = 0x02
NONCE = 12
TAG = 16


class SealError(Exception):
    """A sealed blob did not open: wrong keyring, another record's blob, or tampering."""


def _same(key: bytes) -> bytes:
    return key


class Sealer:
    def __init__(self, keyring: Keyring, subkey: Callable[[bytes], bytes] = _same,
                 reload: Callable[[], Keyring] | None = None):
        self.keyring = keyring
        self._subkey = subkey
        self._reload = reload
        self._lock = threading.Lock()  # a reload's update of the AEADs, once at a time
        # One AEAD per master key, by id; the current one seals.
        self._aeads = {key_id(k): AESGCM(subkey(k)) for k in keyring.keys}
        self._current = keyring.current_id

    def seal(self, plaintext: bytes, aad: str) -> bytes:
        nonce = random_bytes(NONCE)
        return (bytes([V2]) + self._current + nonce
                + self._aeads[self._current].encrypt(nonce, bytes(plaintext), aad.encode()))

    def open(self, blob: bytes, aad: str) -> bytes:
        return self._open(bytes(blob), aad)

    def needs_reseal(self, blob: bytes) -> bool:
        return blob_key_id(blob) != self._current

    def reseal(self, blob: bytes, aad: str) -> bytes:
        """`blob` under the current key; a blob already there is returned as it is."""
        if not self.needs_reseal(blob):
            return bytes(blob)
        return self.seal(self.open(blob, aad), aad)

    def _open(self, blob: bytes, aad: str) -> bytes:
        if blob[:1] == bytes([V2]) and len(blob) >= 1 + KEY_ID_BYTES + NONCE + TAG:
            kid = blob[1:1 + KEY_ID_BYTES]
            aead = self._aeads.get(kid) or self._reloaded(kid)
            if aead is None:
                raise SealError(f"{aad} is sealed under master key {kid.hex()}, which is not in "
                                f"the keyring (it holds {', '.join(i.hex() for i in self._aeads)})")
            body = blob[1 + KEY_ID_BYTES:]
            try:
                return aead.decrypt(body[:NONCE], body[NONCE:], aad.encode())
            except InvalidTag:
                raise SealError(f"sealed data for {aad} did not open (tampered, or another "
                                "record's)") from None
        if blob[:1] == bytes([V1]) and len(blob) >= 1 + NONCE + TAG:
            for aead in self._aeads.values():
                try:
                    return aead.decrypt(blob[1:1 + NONCE], blob[1 + NONCE:], aad.encode())
                except InvalidTag:
                    continue
            raise SealError(f"sealed data for {aad} did not open under any key of the keyring")
        raise SealError(f"sealed data for {aad} is in no known format")


    def _reloaded(self, kid: bytes) -> AESGCM | None:
        """The AEAD of `kid` if the keyring, read again, now holds it."""
        if self._reload is None:
            return None
        try:
            fresh = self._reload()
        except (MasterKeyError, OSError):
            return None
        with self._lock:
            for k in fresh.keys:
                self._aeads.setdefault(key_id(k), AESGCM(self._subkey(k)))
            return self._aeads.get(kid)


def blob_key_id(blob: bytes) -> bytes | None:
    """The id of the master key a blob names; None for format 0x01 (it names none)."""
    blob = bytes(blob)
    if blob[:1] == bytes([V2]):
        return blob[1:1 + KEY_ID_BYTES]
    return None
