"""The platform's secrets at rest (the encryption sets' identity credentials), sealed by
the sealer both daemons share (`daemonkit.sealer`, AES-256-GCM, a key id in every blob).

The keyring is read from `--master-key-file`, or `$CREDENTIALS_DIRECTORY/platform-master-key`
(systemd LoadCredential=), or DATA_DIR/master.key; it is made (0600) only with a new state
(`daemonkit.keyring.open_keyring`). The AAD of a set's credential is "des:NAME".

Rotation (`nbdserver rotate-master-key`, docs/operations.md "Rotating the master key")
puts a new key first in the keyring file and changes nothing else, so it is safe while
the server runs. At its next start the platform re-seals, before serving, every credential
not under the current key (`reseal`), and records which key it seals under (`SEALING_KEY`);
an older key is retired only once no blob names it and the server sealing has the current
key (`status`), or a still-running server could seal a new credential under the old key.
"""

from __future__ import annotations

import logging
import os

from daemonkit import rotation
from daemonkit.keyring import (
    Keyring,
    KeySource,
    MasterKeyError,
    key_source,
    open_keyring,
    read_keyring,
)
from daemonkit.sealer import Sealer, SealError

from .state import State

__all__ = ["MasterKeyError", "Sealer", "SealError", "platform_key_source", "load_keyring",
           "reseal", "status", "rotate_master_key", "platform_sealer"]

log = logging.getLogger("nbdserver.platform")
SEALING_KEY = "sealing_key_id"  # state config: the key id the last started server seals under


def platform_key_source(data_dir: str, master_key_file: str | None) -> KeySource:
    return key_source(data_dir, master_key_file, credential="platform-master-key",
                      default_name="master.key")


def load_keyring(data_dir: str, master_key_file: str | None, *, holds_state: bool) -> Keyring:
    return open_keyring(platform_key_source(data_dir, master_key_file),
                        holds_sealed_state=holds_state, state=f"the platform state in {data_dir}")


def platform_sealer(data_dir: str, master_key_file: str | None, *, holds_state: bool) -> Sealer:
    """The sealer, reading the keyring again for a key another server re-sealed under."""
    source = platform_key_source(data_dir, master_key_file)
    return Sealer(load_keyring(data_dir, master_key_file, holds_state=holds_state),
                  reload=lambda: read_keyring(source.path))


def reseal(state: State, sealer: Sealer) -> int:
    """Every credential under the current key, each a compare-and-set of the credential
    alone (another server on the same state may change the rest of the row, or re-seal
    it first), then the key recorded as the one this server seals under. A blob that
    does not open stops the start: the keyring is not the one the state was sealed under."""
    moved = 0
    for des in state.list_des():
        if not sealer.needs_reseal(des.identity_sealed):
            continue
        try:
            new = sealer.reseal(des.identity_sealed, f"des:{des.name}")
        except SealError as e:
            raise MasterKeyError(f"{e}: start with the keyring that sealed it") from None
        with state.transaction():
            moved += state.replace_des_sealed(des.name, des.identity_sealed, new)
    with state.transaction():
        state.set_config(SEALING_KEY, sealer.keyring.current_id.hex())
    if moved:
        log.info("re-sealed %d encryption set credential(s) under master key %s",
                 moved, sealer.keyring.current_id.hex())
    return moved


def status(state: State, keyring: Keyring) -> dict:
    """Which key seals what, and which older keys can be retired now."""
    return rotation.seal_status(keyring, (d.identity_sealed for d in state.list_des()),
                       state.get_config(SEALING_KEY))


def rotate_master_key(data_dir: str, master_key_file: str | None, action: str,
                      state_url: str | None = None) -> dict:
    """`nbdserver rotate-master-key`: `action` "rotate", "retire" or "status"; the status
    after it. Reads the state (the server may be running: SQLite's WAL lets it)."""
    source = platform_key_source(data_dir, master_key_file)
    db = os.path.join(data_dir, "platform.db")
    if state_url in (None, "", "sqlite"):
        state_url = None
        if not os.path.exists(db):
            raise MasterKeyError(f"{data_dir} holds no platform state (platform.db)")
    state = State(db, data_dir, state_url=state_url)
    try:
        if action == "rotate":
            rotation.rotate(source)
        elif action == "retire":
            rotation.retire(source, status(state, read_keyring(source.path)))
        return status(state, read_keyring(source.path))
    finally:
        state.close()
