"""The sealed store: what is on disk, and what a wrong key or a moved row does."""
import os
import sqlite3

import pytest

from keyservice.domain import rsakeys
from keyservice.domain.keys import Key, KeyVersion
from keyservice.sealing import MasterKeyError, Seal, SealError, load_master_key
from keyservice.store import Store


def version(v, private):
    return KeyVersion(v, 2048, rsakeys.public_der(private), True, None, None, ("wrapKey",), 0.0, 0.0)


def test_private_keys_are_sealed_and_bound_to_their_row(tmp_path):
    store = Store(tmp_path)
    private = rsakeys.generate(2048)
    k = Key("vault-a", "k", 0.0)
    with store.transaction():
        store.put_key(k)
        store.add_version(k, version("a" * 32, private), rsakeys.private_der(private))
        k.versions.append(version("a" * 32, private))
        store.add_version(k, version("b" * 32, private), rsakeys.private_der(private))
    assert store.private_der("vault-a", "k", "a" * 32) == rsakeys.private_der(private)
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("keyservice.db*"))
    assert rsakeys.private_der(private) not in raw
    # copy version a's sealed blob onto version b: the AAD no longer matches
    db = sqlite3.connect(tmp_path / "keyservice.db")
    (blob,) = db.execute("SELECT sealed_private FROM key_versions WHERE version=?", ("a" * 32,)).fetchone()
    db.execute("UPDATE key_versions SET sealed_private=? WHERE version=?", (blob, "b" * 32))
    db.commit()
    db.close()
    store = Store(tmp_path)
    with pytest.raises(SealError):
        store.private_der("vault-a", "k", "b" * 32)
    store.close()


def test_wal_mode_and_master_key_checks(tmp_path):
    store = Store(tmp_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    (tmp_path / "master-key").write_bytes(os.urandom(32))
    with pytest.raises(MasterKeyError, match="does not match"):
        Store(tmp_path)
    (tmp_path / "master-key").unlink()
    with pytest.raises(MasterKeyError, match="not found"):
        Store(tmp_path)


def test_master_key_formats(tmp_path):
    key = os.urandom(32)
    (tmp_path / "raw").write_bytes(key)
    (tmp_path / "hex").write_text(key.hex() + "\n")
    (tmp_path / "bad").write_text("short")
    assert load_master_key(tmp_path / "raw", False, False).keys == (key,)
    assert load_master_key(tmp_path / "hex", False, False).keys == (key,)
    with pytest.raises(MasterKeyError, match="32 raw bytes"):
        load_master_key(tmp_path / "bad", False, False)
    with pytest.raises(MasterKeyError, match="systemd credential"):
        load_master_key(tmp_path / "absent", False, True)


def test_seal_roundtrip_and_tamper():
    s = Seal(b"m" * 32)
    blob = s.seal(b"secret", "row:1")
    assert s.open(blob, "row:1") == b"secret"
    for bad_blob, aad in ((blob, "row:2"), (blob[:-1] + bytes([blob[-1] ^ 1]), "row:1"),
                          (b"\x03" + blob[1:], "row:1"), (b"\x01", "row:1")):
        with pytest.raises(SealError):
            s.open(bad_blob, aad)
    with pytest.raises(SealError):
        Seal(b"n" * 32).open(blob, "row:1")
