"""daemonkit's sealer and keyring: the blob format, rotation, and what both daemons
wrote before key ids (blobs made by the previous release's own code, kept here)."""

from __future__ import annotations

import os
import stat

import pytest

from daemonkit.keyring import (
    KEY_BYTES,
    Keyring,
    MasterKeyError,
    key_id,
    key_source,
    open_keyring,
    parse_keyring,
    read_keyring,
    write_keyring,
)
from daemonkit.rotation import seal_status
from daemonkit.sealer import Sealer, SealError, blob_key_id
from keyservice.sealing import derive

# Made by the release before key ids (nbdserver/platform/sealing.py's Sealer and
# keyservice/sealing.py's Seal of commit feb8750) under the key 00 01 .. 1f.
OLD_KEY = bytes(range(32))
OLD_PLATFORM_BLOB = bytes.fromhex(
    "01053044a801053d56bae0b68fce25f31f13f5e25cac6d00904f310f01d773dd8ec590d2b026481a592434da58"
    "ff0d5402f1fc76ad2fa398773eb87d36a64a45eca6791fc6")
OLD_KEYSERVICE_BLOB = bytes.fromhex(
    "014e81c2fdc9941526c1862afee954b37574e95ee861c40d4805f8065957c40bd5e42efb6466597c895c38ae")


def _ks_subkey(master: bytes) -> bytes:
    return derive(master, "seal/v1")


def test_blobs_of_the_previous_release_open_and_move_to_the_current_key():
    ring = Keyring((OLD_KEY,)).rotated()  # the old key is now an older one
    platform = Sealer(ring)
    assert platform.open(OLD_PLATFORM_BLOB, "des:des1") == b'{"client_id": "c", "client_secret": "s"}'
    assert platform.needs_reseal(OLD_PLATFORM_BLOB)
    moved = platform.reseal(OLD_PLATFORM_BLOB, "des:des1")
    assert moved[0] == 2 and blob_key_id(moved) == ring.current_id
    assert not platform.needs_reseal(moved)
    assert platform.open(moved, "des:des1") == platform.open(OLD_PLATFORM_BLOB, "des:des1")
    ks = Sealer(ring, _ks_subkey)
    assert ks.open(OLD_KEYSERVICE_BLOB, "key-version:v/k/1") == b"private key der"


def test_a_blob_names_its_key_and_opens_only_for_its_record():
    ring = Keyring((os.urandom(32),))
    s = Sealer(ring)
    blob = s.seal(b"secret", "des:a")
    assert blob[:1] == b"\x02" and blob[1:5] == key_id(ring.current) and b"secret" not in blob
    assert s.open(blob, "des:a") == b"secret"
    with pytest.raises(SealError, match="did not open"):
        s.open(blob, "des:b")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(SealError):
        s.open(bytes(tampered), "des:a")
    with pytest.raises(SealError, match="no known format"):
        s.open(b"\x07" + blob[1:], "des:a")


def test_a_blob_under_a_key_outside_the_keyring_is_refused_by_its_id():
    old = Keyring((os.urandom(32),))
    blob = Sealer(old).seal(b"secret", "des:a")
    other = Keyring((os.urandom(32),))
    with pytest.raises(SealError, match=f"master key {old.current_id.hex()}, which is not in"):
        Sealer(other).open(blob, "des:a")
    with pytest.raises(SealError, match="any key of the keyring"):
        Sealer(other).open(OLD_PLATFORM_BLOB, "des:des1")


def test_rotation_keeps_old_keys_and_status_says_when_one_can_go():
    ring = Keyring((os.urandom(32),))
    old_blob = Sealer(ring).seal(b"x", "r")
    new = ring.rotated()
    assert new.keys[1:] == ring.keys and new.current_id != ring.current_id
    st = seal_status(new, [old_blob], sealing_key=ring.current_id.hex())
    assert st["retirable"] == [] and st["blockedBy"]  # the daemon still seals under the old key
    st = seal_status(new, [Sealer(new).reseal(old_blob, "r")], sealing_key=new.current_id.hex())
    assert st["retirable"] == [ring.current_id.hex()] and st["blockedBy"] == []
    assert st["keys"] == [{"id": new.current_id.hex(), "blobs": 1},
                          {"id": ring.current_id.hex(), "blobs": 0}]
    assert seal_status(new, [OLD_PLATFORM_BLOB], new.current_id.hex())["legacyBlobs"] == 1
    assert new.retired([]).keys == (new.current,)


def test_keyring_files(tmp_path):
    one = tmp_path / "raw"
    one.write_bytes(OLD_KEY)
    assert read_keyring(one).keys == (OLD_KEY,)  # what both daemons wrote before
    (tmp_path / "hex").write_text(OLD_KEY.hex() + "\n")
    assert read_keyring(tmp_path / "hex").keys == (OLD_KEY,)  # what the key service also took
    ring = Keyring((OLD_KEY,)).rotated()
    path = tmp_path / "ring"
    write_keyring(path, ring)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keyring(path) == ring
    for bad in (b"short", b"zz" * 32, OLD_KEY.hex().encode() + b"\n" + b"ab" * 31):
        with pytest.raises(MasterKeyError, match="hex digits"):
            parse_keyring(bad, "x")
    with pytest.raises(MasterKeyError, match="once"):
        Keyring((OLD_KEY, OLD_KEY))


def test_a_key_is_made_only_for_a_data_directory_without_sealed_state(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    source = key_source(tmp_path, None, credential="c", default_name="master.key")
    with pytest.raises(MasterKeyError, match="not found.*sealed under it"):
        open_keyring(source, holds_sealed_state=True, state="the state")
    assert not source.path.exists()
    made = open_keyring(source, holds_sealed_state=False, state="the state")
    assert len(source.path.read_bytes()) == KEY_BYTES  # the one-key form an older release reads
    assert stat.S_IMODE(source.path.stat().st_mode) == 0o600
    assert open_keyring(source, holds_sealed_state=True, state="the state") == made


def test_a_key_another_instance_added_is_read_again_for_opening():
    ring = Keyring((os.urandom(32),))
    rotated = ring.rotated()
    blob = Sealer(rotated).seal(b"secret", "r")  # sealed by an instance on the new keyring
    files = [ring]  # what the keyring file holds: the old keyring, then the new one
    stale = Sealer(ring, reload=lambda: files[-1])
    with pytest.raises(SealError, match="not in the keyring"):
        stale.open(blob, "r")
    files.append(rotated)
    assert stale.open(blob, "r") == b"secret"
    assert blob_key_id(stale.seal(b"x", "r")) == ring.current_id  # still seals as it started
    assert Sealer(ring).needs_reseal(blob)
