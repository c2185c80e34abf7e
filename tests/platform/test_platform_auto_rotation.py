"""Automatic key rotation of an encryption set (nbdserver/platform/auto_rotation.py).

- A set created with `--auto-rotate` follows its key: after `key rotate`, within a
  deadline far below the lease (so by the change stream), every disk's DEK is wrapped
  under the new version, as one operation `operation list` shows, while a client stays
  attached and its data reads back; `des show` reports the active version and the time.
  A set on the same key without auto-rotate stays on its version. The old version then
  disabled locks the manual set's disk and not the rotated ones.
- A new version the set may not wrap with (wrapKey taken away): the set reports the
  failure and keeps the old version, the disk keeps serving; granted again, the policy
  change's event retries and the set rotates.
- A version added while the platform was down is followed once it is back (the stream's
  reconnection checks every set: what it missed).
- `des update --auto-rotate` on a manual set catches up at once; bad input is a 400.
- A state database of schema version 1 (before these fields) is migrated: its sets are
  manual.
"""

from __future__ import annotations

import sqlite3

from nbdserver.platform.model import EncryptionSet
from nbdserver.platform.state import SCHEMA_VERSION, State
from tests.helpers.platform import CliFailed, Writer, pattern, wait_for_io
from tests.helpers.servers import wait_until

# Far below the stacks' lease (60 s): a rotation seen within it came by the change stream.
EVENT_DEADLINE = 20.0


def _auto_set(stack, vault: str, des: str, *, perms: str = "get,wrapKey,unwrapKey") -> dict:
    stack.keyservice("vault", "create", vault, "--location", "local", "--subscription", "sub1",
                     "--enable-purge-protection")
    kid = stack.keyservice("key", "create", vault, "k1", "--size", "2048")["key"]["kid"]
    shown = stack.nbdserver("des", "create", des, "--auto-rotate",
                            "--key-url", stack.key_url(vault, "k1"))
    assert shown["rotationToLatestKeyVersionEnabled"] is True, shown
    stack.grant(vault, shown["identity"]["objectId"], perms)
    return {"kid": kid, "object_id": shown["identity"]["objectId"]}


def _versions(stack, disks) -> set[str]:
    return {stack.disk(d)["encryption"]["kid"] for d in disks}


def _unwrapped_since(stack, vault: str, seen: int, object_id: str, kid: str) -> bool:
    """The identity unwrapped with `kid` after audit entry number `seen`: a key check."""
    entries = stack.keyservice("audit", "show", vault, "--limit", "1000")["value"][seen:]
    return any(e.get("caller") == object_id and e.get("operation", "").startswith("KeyUnwrap")
               and e.get("kid") == kid and e.get("status") == 200 for e in entries)


def _rotated_to(stack, des: str, kid: str) -> bool:
    """The set's rotation to `kid` has ended: every volume re-wrapped, the set updated."""
    shown = stack.nbdserver("des", "show", des)
    return shown["activeKey"]["keyUrl"] == kid and shown["keyRotationState"] == "Succeeded"


def _rotations(stack, des: str) -> list[dict]:
    return [op for op in stack.nbdserver("operation", "list")
            if op["kind"] == "encryptionSetKeyRotation" and op["target"] == des]


def test_auto_rotate_rewraps_every_disk_while_a_client_stays_attached(make_stack):
    stack = make_stack()
    auto = _auto_set(stack, "arv", "des-auto")
    manual = stack.nbdserver("des", "create", "des-manual", "--key-url", stack.key_url("arv", "k1"))
    assert manual["rotationToLatestKeyVersionEnabled"] is False
    stack.grant("arv", manual["identity"]["objectId"])  # a second policy on the same vault
    disks = ["ar1", "ar2", "ar3"]
    for d in disks:
        stack.create_disk(d, "--size", "16M", "--des", "des-auto")
    stack.create_disk("man1", "--size", "16M", "--des", "des-manual")
    assert _versions(stack, disks + ["man1"]) == {auto["kid"]}
    shown = stack.nbdserver("des", "show", "des-auto")
    assert shown["activeKey"]["keyUrl"] == auto["kid"], shown
    assert shown["lastKeyRotationTimestamp"] is None and shown["autoKeyRotationError"] is None
    assert shown["keyRotationState"] is None

    h = stack.connect("ar2")
    before = pattern(0xA2, 1 << 20)
    h.pwrite(before, 0)
    h.flush()
    h.shutdown()
    w = Writer(stack, "ar1", span=2 << 20)
    w.start()
    try:
        wait_until(lambda: w.count > 10 or w.error, 20, what="the writer to run")
        new = stack.keyservice("key", "rotate", "arv", "k1")["key"]["kid"]
        wait_until(lambda: _rotated_to(stack, "des-auto", new), EVENT_DEADLINE,
                   interval=0.2, what="the set's rotation to the new version")
        assert _versions(stack, disks) == {new}
        shown = stack.nbdserver("des", "show", "des-auto")
        assert shown["activeKey"]["keyUrl"] == new, shown
        assert shown["lastKeyRotationTimestamp"] and shown["autoKeyRotationError"] is None, shown
        assert shown["keyRotationState"] == "Succeeded", shown
        assert shown["keyUrl"] == stack.key_url("arv", "k1")  # still follows the versionless URL
        ops = _rotations(stack, "des-auto")
        assert [op["status"] for op in ops] == ["succeeded"], ops
        assert ops[0]["result"]["rewrapped"] == len(disks), ops

        # The set without auto-rotate stays where it was.
        assert stack.disk("man1")["encryption"]["kid"] == auto["kid"]
        shown = stack.nbdserver("des", "show", "des-manual")
        assert shown["activeKey"]["keyUrl"] == auto["kid"] and not _rotations(stack, "des-manual")

        n = w.count
        wait_until(lambda: w.count > n + 10 or w.error, 20, what="I/O to go on after rotation")
        assert w.error is None, w.error
        h = stack.connect("ar2")  # a new attach unwraps the re-wrapped envelope: same DEK
        assert h.pread(len(before), 0) == before
        h.shutdown()

        # The old version off: the manual set's disk locks, the rotated ones no longer
        # depend on it (a key check of theirs after the disable still unwraps).
        seen = len(stack.keyservice("audit", "show", "arv", "--limit", "1000")["value"])
        stack.keyservice("key", "disable", "arv", "k1", "--version", auto["kid"].rsplit("/", 1)[1])
        stack.wait_serving("man1", "locked")
        wait_until(lambda: _unwrapped_since(stack, "arv", seen, auto["object_id"], new), 20,
                   what="a key check of the rotated set after the disable")
        n = w.count
        wait_until(lambda: w.count > n + 10 or w.error, 20, what="I/O after the old version is off")
        assert w.error is None, w.error
        assert all(stack.serving_state(d) != "locked" for d in disks)
        w.stop()
        wait_for_io(w.h)
        w.verify()
    finally:
        w.close()

    # Nobody without the API token sees the set or its operations.
    for path in ("/encryption-sets/des-auto", "/operations"):
        status, _ = stack.api("GET", path, token=None)
        assert status == 401


def test_new_version_without_wrap_permission_keeps_the_old_one(make_stack):
    stack = make_stack()
    auto = _auto_set(stack, "arw", "des-w")
    stack.create_disk("w1", "--size", "16M", "--des", "des-w")
    w = Writer(stack, "w1", span=1 << 20)
    w.start()
    try:
        wait_until(lambda: w.count > 10 or w.error, 20, what="the writer to run")
        # Enough to serve (get, unwrapKey), not to wrap.
        stack.grant("arw", auto["object_id"], "get,unwrapKey")
        new = stack.keyservice("key", "rotate", "arw", "k1")["key"]["kid"]

        def error():
            return stack.nbdserver("des", "show", "des-w")["autoKeyRotationError"]
        err = wait_until(error, EVENT_DEADLINE, interval=0.2, what="the set to report the failure")
        assert "wrapKey" in err["message"] and new in err["message"], err
        assert err["code"] and err["time"], err
        shown = stack.nbdserver("des", "show", "des-w")
        assert shown["activeKey"]["keyUrl"] == auto["kid"], shown
        assert shown["lastKeyRotationTimestamp"] is None, shown
        assert shown["keyRotationState"] == "Failed", shown
        assert stack.disk("w1")["encryption"]["kid"] == auto["kid"]
        assert [op["status"] for op in _rotations(stack, "des-w")] == ["failed"]
        n = w.count
        wait_until(lambda: w.count > n + 10 or w.error, 20, what="I/O while the set cannot rotate")
        assert w.error is None, w.error

        # Granted again: the policy change's event retries, and the set rotates.
        stack.grant("arw", auto["object_id"])
        wait_until(lambda: _rotated_to(stack, "des-w", new), EVENT_DEADLINE,
                   interval=0.2, what="the retry to rotate the set")
        assert stack.disk("w1")["encryption"]["kid"] == new
        shown = stack.nbdserver("des", "show", "des-w")
        assert shown["activeKey"]["keyUrl"] == new and shown["autoKeyRotationError"] is None, shown
        assert shown["keyRotationState"] == "Succeeded", shown
        n = w.count
        wait_until(lambda: w.count > n + 10 or w.error, 20, what="I/O after the retry")
        assert w.error is None, w.error
        w.stop()
        w.verify()
    finally:
        w.close()


def test_version_added_while_the_platform_was_down_is_followed(make_stack):
    stack = make_stack()
    _auto_set(stack, "ard", "des-d")
    stack.create_disk("d1", "--size", "16M", "--des", "des-d")
    data = pattern(0xD1, 1 << 20)
    h = stack.connect("d1")
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()
    stack.stop_nbdserver()
    new = stack.keyservice("key", "rotate", "ard", "k1")["key"]["kid"]
    stack.start_nbdserver()
    wait_until(lambda: _rotated_to(stack, "des-d", new), EVENT_DEADLINE,
               interval=0.2, what="the restarted platform to follow the new version")
    assert stack.disk("d1")["encryption"]["kid"] == new
    h = stack.connect("d1")
    assert h.pread(len(data), 0) == data
    h.shutdown()


def test_switching_auto_rotate_on_catches_up_and_bad_input_is_refused(make_stack):
    stack = make_stack()
    c = stack.customer_key("arsw", "k1", "des-sw")
    stack.create_disk("sw1", "--size", "16M", "--des", "des-sw")
    new = stack.keyservice("key", "rotate", "arsw", "k1")["key"]["kid"]
    # Manual: the event changes nothing; a set that is later switched on catches up at once.
    assert stack.disk("sw1")["encryption"]["kid"] == c["kid"]
    shown = stack.nbdserver("des", "update", "des-sw", "--auto-rotate")
    assert shown["rotationToLatestKeyVersionEnabled"] is True
    wait_until(lambda: _rotated_to(stack, "des-sw", new), EVENT_DEADLINE,
               interval=0.2, what="the switched-on set to catch up")
    assert stack.disk("sw1")["encryption"]["kid"] == new
    assert {s["name"]: s["rotationToLatestKeyVersionEnabled"]
            for s in stack.nbdserver("des", "list")} == {"des-sw": True}
    off = stack.nbdserver("des", "update", "des-sw", "--no-auto-rotate")
    assert off["rotationToLatestKeyVersionEnabled"] is False
    assert off["activeKey"]["keyUrl"] == new and off["lastKeyRotationTimestamp"]
    assert off["keyRotationState"] == "Succeeded", off  # not its own update, in progress

    r = stack.nbdserver("des", "update", "des-sw", check=False)
    assert r.returncode == 2 and "--auto-rotate" in r.stderr, r
    for body in ({"rotationToLatestKeyVersionEnabled": "yes"}, {}):
        status, out = stack.api("PATCH", "/encryption-sets/des-sw", body)
        assert status == 400 and "rotationToLatestKeyVersionEnabled" in out["error"]["message"], out
    status, out = stack.api("POST", "/encryption-sets", {
        "name": "des-bad", "keyUrl": stack.key_url("arsw", "k1"),
        "rotationToLatestKeyVersionEnabled": 1})
    assert status == 400, out
    try:
        stack.nbdserver("des", "update", "nosuchset", "--auto-rotate")
        raise AssertionError("an unknown set was updated")
    except CliFailed as e:
        assert "not found" in e.stderr


def test_schema_1_database_is_migrated_with_manual_sets(tmp_path):
    db = tmp_path / "platform.db"
    state = State(str(db))
    state.put_des(EncryptionSet("old", "sub1", "local", "http://ks/vaults/v/keys/k", "oid",
                                b"sealed", True, 1.0, auto_rotate=True))
    state.close()
    raw = sqlite3.connect(db)  # as release 1 left it: without the rotation columns
    for column in ("auto_rotate", "active_key_url", "last_key_rotation", "rotation_error",
                   "encryption_type"):  # the last one is version 3's
        raw.execute(f"ALTER TABLE encryption_sets DROP COLUMN {column}")
    for column in ("platform_kid", "platform_alg", "platform_wrapped"):
        raw.execute(f"ALTER TABLE volumes DROP COLUMN {column}")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()

    state = State(str(db))
    try:
        assert state.schema_version() == SCHEMA_VERSION >= 2
        des = state.get_des("old")
        assert des is not None and des.identity_sealed == b"sealed" and des.allow_cross_subscription
        assert des.auto_rotate is False and des.active_key_url is None
        assert des.last_key_rotation is None and des.rotation_error is None
    finally:
        state.close()
