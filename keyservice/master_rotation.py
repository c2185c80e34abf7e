"""Master key rotation for the key service (docs/operations.md, "Rotating the master key";
the steps are daemonkit/rotation.py's, the same for both daemons).

`reseal` runs when the service starts, before it listens: every blob not under the
keyring's current key (key versions' private keys or HSM references, the master check,
the sealed service secrets) is re-sealed, in transactions of `BATCH` rows, with progress
in the log; then the current key's id is recorded as the one this instance seals under.
A blob that does not open stops the start by name: the keyring is not the one the state
was sealed under. Each re-sealed blob holds the same secret, so an interrupted re-seal
leaves a state that opens, and the next start finishes it.

`rotate_master_key` is the command: it opens the store first (a state of the release
before key ids gets its service secrets kept, derived from the key it was made with),
then changes the keyring file alone, so it is safe while the service runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from daemonkit import rotation

from .sealing import SEALING_KEY, SECRETS_AAD, SECRETS_META, MasterKeyError, SealError, key_source_of
from .store import DB_NAME, Store

log = logging.getLogger("keyservice")
BATCH = 500  # rows per transaction: one fsync each, and no long hold on the write lock


def reseal(store: Store) -> int:
    seal = store.seal
    pending = [(row, aad, blob) for row, aad, blob in store.sealed_blobs() if seal.needs_reseal(blob)]
    current = seal.keyring.current_id.hex()
    if pending:
        log.info("re-sealing %d blob(s) under master key %s", len(pending), current)
    for start in range(0, len(pending), BATCH):
        with store.transaction():
            for row, aad, blob in pending[start:start + BATCH]:
                try:
                    store.put_sealed(row, seal.reseal(blob, aad))
                except SealError as e:
                    raise MasterKeyError(f"{e}: start with the keyring that sealed it") from None
        log.info("re-sealed %d of %d", min(start + BATCH, len(pending)), len(pending))
    with store.transaction():
        stored = store.meta(SECRETS_META)
        if stored is not None and seal.needs_reseal(bytes.fromhex(stored)):
            store.set_meta(SECRETS_META, seal.reseal(bytes.fromhex(stored), SECRETS_AAD).hex())
        store.set_meta(SEALING_KEY, current)
    return len(pending)


def status(store: Store) -> dict:
    blobs = [blob for _, _, blob in store.sealed_blobs()]
    stored = store.meta(SECRETS_META)
    if stored is not None:
        blobs.append(bytes.fromhex(stored))
    return rotation.seal_status(store.seal.keyring, blobs, store.meta(SEALING_KEY))


def rotate_master_key(data_dir, master_key_file: str | None, action: str, token=None, *,
                      state: str | None = None) -> dict:
    """`keyservice rotate-master-key`: `action` "rotate", "retire" or "status"; the status
    after it. `token`: the PKCS#11 token of a `--seal pkcs11` data directory."""
    data_dir = Path(data_dir)
    from . import hsm_seal
    sealed_in_token = (data_dir / hsm_seal.FILE).exists()
    if sealed_in_token and token is None:
        raise MasterKeyError("this data directory's master key is sealed in a PKCS#11 token: "
                             "name it as serve does (--pkcs11-module, --pkcs11-token)")
    if state is None and not (data_dir / DB_NAME).exists():
        raise MasterKeyError(f"{data_dir} holds no key service database ({DB_NAME})")

    def open_store() -> Store:
        if sealed_in_token:
            return Store(data_dir, master_key=hsm_seal.master_from_token(token, data_dir),
                         state=state)
        return Store(data_dir, master_key_file, state=state)

    source = key_source_of(data_dir, master_key_file)
    store = open_store()
    try:
        if action == "rotate":
            hsm_seal.rotate(token, data_dir) if sealed_in_token else rotation.rotate(source)
        elif action == "retire":
            st = status(store)
            hsm_seal.retire(token, data_dir, st) if sealed_in_token else rotation.retire(source, st)
    finally:
        store.close()
    store = open_store()  # the keyring as it is now
    try:
        return status(store)
    finally:
        store.close()
