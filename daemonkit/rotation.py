"""Rotating a master key, the same way for both daemons (docs/operations.md,
"Rotating the master key").

1. `rotate`: a new key goes first in the keyring file, the older ones stay after it.
   Nothing sealed changes, so this is safe while the daemon runs: it keeps sealing
   under the key it started with, which is still in the keyring.
2. The daemon's next start re-seals every blob not under the current key (each daemon's
   own `reseal`), before it serves, and records the key it seals under.
3. `seal_status` counts the blobs under each key; `retire` drops the older keys no blob
   names, only once the daemon has recorded that it seals under the current key (else a
   daemon still running on the old keyring could seal a new blob under a key being
   dropped).
"""

from __future__ import annotations

from collections.abc import Iterable

from .keyring import Keyring, KeySource, MasterKeyError, read_keyring, write_keyring
from .sealer import blob_key_id


def seal_status(keyring: Keyring, blobs: Iterable[bytes], sealing_key: str | None) -> dict:
    ids = [kid.hex() for kid in keyring.ids()]
    counts: dict[str, int] = dict.fromkeys(ids, 0)
    legacy = 0
    for blob in blobs:
        kid = blob_key_id(blob)
        if kid is None:
            legacy += 1
        else:
            counts[kid.hex()] = counts.get(kid.hex(), 0) + 1
    current = ids[0]
    blocked = []
    if sealing_key != current:
        blocked.append(f"the daemon last started sealing under {sealing_key or 'an older release'}"
                       f", not the current key {current}: restart it (it re-seals at start)")
    if legacy:
        blocked.append(f"{legacy} blob(s) in the format before key ids: restart the daemon")
    unknown = {k: n for k, n in counts.items() if k not in ids}
    if unknown:
        blocked.append(f"blobs under keys not in the keyring: {unknown}")
    return {"current": current, "sealingKey": sealing_key,
            "keys": [{"id": k, "blobs": counts[k]} for k in ids],
            "legacyBlobs": legacy, "unknownKeys": unknown,
            "retirable": [] if blocked else [k for k in ids[1:] if counts[k] == 0],
            "blockedBy": blocked}


def _writable(source: KeySource) -> None:
    if not source.writable:
        raise MasterKeyError(
            f"{source.path} is a systemd credential (read-only): rotate a copy of it with "
            "--master-key-file, then install that copy as the credential (docs/operations.md)")


def rotate(source: KeySource) -> Keyring:
    """A new current key in the keyring file at `source`; the older keys kept after it."""
    _writable(source)
    if not source.path.exists():
        raise MasterKeyError(f"there is no master key at {source.path} to rotate")
    keyring = read_keyring(source.path).rotated()
    write_keyring(source.path, keyring)
    return keyring


def retire(source: KeySource, status: dict) -> Keyring:
    """The keyring file without the keys `status` found retirable."""
    _writable(source)
    if status["blockedBy"]:
        raise MasterKeyError("no key can be retired yet: " + "; ".join(status["blockedBy"]))
    keyring = read_keyring(source.path)
    gone = set(status["retirable"])
    kept = keyring.retired(k for k in keyring.ids()[1:] if k.hex() not in gone)
    if kept != keyring:
        write_keyring(source.path, kept)
    return kept
