"""The platform master key's rotation, end to end with both daemons as processes.

- `nbdserver rotate-master-key` while the server runs: a new current key, the old one
  kept; the running server still seals under the old key, so nothing can be retired;
  after a restart every encryption set's credential is under the new key, the old key is
  retired, and after another restart the sets' disks still open (their credentials
  unseal, the key service unwraps with them).
- A credential sealed in the format before key ids (an upgraded data directory) opens
  and is re-sealed at start.
- A credential under a key that is not in the keyring stops the start with a message
  naming the key id, not a traceback.
"""

from __future__ import annotations

import os
import sqlite3
import stat

import nbd
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.helpers.platform import CliFailed, NbdServerProcess, pattern


def _keys(stack, *args) -> dict:
    return stack.nbdserver("rotate-master-key", "--data-dir", stack.nb_dir, *args)


def _write(stack, disk: str, tag: int) -> bytes:
    data = pattern(tag, 1 << 20)
    h = stack.connect(disk)
    try:
        h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    finally:
        h.shutdown()
    return data


def _reads(stack, disk: str, data: bytes) -> None:
    h = stack.connect(disk)
    try:
        assert h.pread(len(data), 0) == data
    finally:
        h.shutdown()


def _sealed(stack, des: str) -> bytes:
    db = sqlite3.connect(stack.nb_dir / "platform.db")
    try:
        return bytes(db.execute("SELECT identity_sealed FROM encryption_sets WHERE name=?",
                                (des,)).fetchone()[0])
    finally:
        db.close()


def test_rotate_restart_retire_and_every_set_still_opens(make_stack):
    stack = make_stack()
    stack.customer_key("mkrot", "k1", "desrot1")
    stack.create_disk("mkdisk1", "--size", "16M", "--des", "desrot1")
    data = _write(stack, "mkdisk1", 0x51)
    before = _keys(stack, "--status")
    old = before["current"]
    assert before["keys"] == [{"id": old, "blobs": 1}] and before["sealingKey"] == old

    after = _keys(stack)  # the server keeps running
    new = after["current"]
    assert new != old and [k["id"] for k in after["keys"]] == [new, old]
    assert stat.S_IMODE((stack.nb_dir / "master.key").stat().st_mode) == 0o600
    # The running server still seals under the key it started with: nothing can go yet.
    stack.customer_key("mkrot2", "k1", "desrot2")
    st = _keys(stack, "--status")
    assert st["keys"] == [{"id": new, "blobs": 0}, {"id": old, "blobs": 2}]
    assert st["retirable"] == [] and "restart" in st["blockedBy"][0]
    with pytest.raises(CliFailed, match="no key can be retired yet"):
        _keys(stack, "--retire")

    stack.restart_nbdserver()  # re-seals at start
    st = _keys(stack, "--status")
    assert st["keys"] == [{"id": new, "blobs": 2}, {"id": old, "blobs": 0}]
    assert st["sealingKey"] == new and st["retirable"] == [old]
    assert _keys(stack, "--retire")["keys"] == [{"id": new, "blobs": 2}]
    lines = [ln for ln in (stack.nb_dir / "master.key").read_text().splitlines()
             if not ln.startswith("#")]
    assert len(lines) == 1

    stack.restart_nbdserver()
    _reads(stack, "mkdisk1", data)  # desrot1's credential unsealed, the DEK unwrapped with it
    stack.create_disk("mkdisk2", "--size", "16M", "--des", "desrot2")
    _reads(stack, "mkdisk2", _write(stack, "mkdisk2", 0x52))


def test_a_credential_sealed_before_key_ids_opens_and_is_resealed(make_stack):
    stack = make_stack()
    stack.customer_key("mkold", "k1", "desold")
    stack.create_disk("mkolddisk", "--size", "16M", "--des", "desold")
    data = _write(stack, "mkolddisk", 0x53)
    stack.stop_nbdserver()
    # What the release before key ids wrote: 0x01 || nonce || AES-256-GCM under the
    # master key itself, AAD "des:NAME" (nbdserver/platform/sealing.py of that release).
    master = (stack.nb_dir / "master.key").read_bytes()
    blob = _sealed(stack, "desold")
    aead = AESGCM(master)
    credential = aead.decrypt(blob[5:17], blob[17:], b"des:desold")
    nonce = os.urandom(12)
    legacy = b"\x01" + nonce + aead.encrypt(nonce, credential, b"des:desold")
    db = sqlite3.connect(stack.nb_dir / "platform.db")
    with db:
        db.execute("UPDATE encryption_sets SET identity_sealed=? WHERE name='desold'", (legacy,))
    db.close()
    assert _keys(stack, "--status")["legacyBlobs"] == 1

    stack.start_nbdserver()
    st = _keys(stack, "--status")
    assert st["legacyBlobs"] == 0 and st["keys"][0]["blobs"] == 1
    assert _sealed(stack, "desold")[:1] == b"\x02"
    _reads(stack, "mkolddisk", data)


def test_a_credential_under_a_key_outside_the_keyring_stops_the_start(make_stack):
    stack = make_stack()
    stack.customer_key("mkgone", "k1", "desgone")
    stack.stop_nbdserver()
    key = stack.nb_dir / "master.key"
    original = key.read_bytes()
    kid = _sealed(stack, "desgone")[1:5].hex()
    key.write_text(os.urandom(32).hex() + "\n")
    proc = NbdServerProcess(stack.workdir, stack.nb_dir, stack.ks, lease=stack.lease,
                            grace=stack.grace)
    with pytest.raises(RuntimeError):
        proc.start()
    err = proc.stderr_text()
    assert f"master key {kid}, which is not in the keyring" in err and "Traceback" not in err, err
    key.write_bytes(original)
    stack.start_nbdserver()
    assert stack.nbdserver("des", "show", "desgone")["name"] == "desgone"
