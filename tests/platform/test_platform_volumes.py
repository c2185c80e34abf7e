"""Keys of disks over their life: PMK by default, PMK -> CMK online, rotation, the set
rules, snapshots and images (and their rules), a scale set from one image, deletion."""

from __future__ import annotations

import pytest

from tests.helpers.platform import CliFailed, Writer, pattern, wait_for_eio, wait_for_io
from tests.helpers.servers import wait_until


def _refused(call) -> str:
    with pytest.raises(CliFailed) as e:
        call()
    return e.value.stderr


def test_platform_managed_key_is_the_default(stack):
    d = stack.create_disk("pmk1", "--size", "16M")
    enc = d["encryption"]
    assert enc["type"] == "EncryptionAtRestWithPlatformKey" and enc["diskEncryptionSet"] is None
    assert "/vaults/nbd-platform/keys/" in enc["kid"] and enc["keyVersion"]
    env = stack.nbdserver("disk", "key-envelope", "pmk1")
    assert env["kid"] == enc["kid"] and env["alg"] == "RSA-OAEP-256" and env["value"]
    h = stack.connect("pmk1")
    h.pwrite(pattern(1, 65536), 0)
    assert h.pread(65536, 0) == pattern(1, 65536)
    h.shutdown()
    # The platform's own identity wraps PMK DEKs, in its own audited vault (the unwraps
    # at open are checked in test_platform_restart).
    entries = stack.keyservice("audit", "show", "nbd-platform")["value"]
    wraps = [e for e in entries if e.get("operation", "").startswith("KeyWrap")
             and e.get("status") == 200 and "platform-dek-wrapping" in (e.get("kid") or "")]
    assert wraps and {e.get("caller") for e in wraps} == {_admin_object_id(stack)}, wraps


def _admin_object_id(stack) -> str:
    import json
    return json.loads(stack.ks.admin_credential.read_text())["object_id"]


def test_encryption_set_rules(stack):
    ks = stack.keyservice
    ks("vault", "create", "nopp", "--location", "local", "--subscription", "sub1")
    ks("key", "create", "nopp", "k1", "--size", "2048")
    err = _refused(lambda: stack.nbdserver("des", "create", "d-nopp",
                                           "--key-url", stack.key_url("nopp", "k1")))
    assert "vault-purge-protection" in err and "purge protection" in err

    stack.customer_key("faraway", "k1", location="elsewhere")
    err = _refused(lambda: stack.nbdserver("des", "create", "d-far", "--location", "local",
                                           "--key-url", stack.key_url("faraway", "k1")))
    assert "vault-same-location" in err

    stack.customer_key("othersub", "k1", subscription="sub2")
    err = _refused(lambda: stack.nbdserver("des", "create", "d-other", "--subscription", "sub1",
                                           "--key-url", stack.key_url("othersub", "k1")))
    assert "vault-same-subscription" in err
    ok = stack.nbdserver("des", "create", "d-other", "--subscription", "sub1",
                         "--allow-cross-subscription", "--key-url", stack.key_url("othersub", "k1"))
    assert ok["allowCrossSubscription"] is True and ok["subscription"] == "sub1"

    # The platform key's scope name cannot be taken by a customer's set.
    err = _refused(lambda: stack.nbdserver("des", "create", "platform",
                                           "--key-url", stack.key_url("othersub", "k1")))
    assert "reserved" in err

    for bad in (stack.key_url("nosuchvault", "k1"), "http://127.0.0.1:1/vaults/v/keys/k",
                "not-a-url"):
        err = _refused(lambda: stack.nbdserver("des", "create", "d-bad", "--key-url", bad))
        assert "HTTP 400" in err, err


def test_pmk_to_cmk_online_then_rotation(stack):
    c = stack.customer_key("rot", "k1", "des-rot")
    stack.create_disk("mv1", "--size", "16M", "--subscription", "sub1")
    stack.create_disk("mv-default-sub", "--size", "16M")
    err = _refused(lambda: stack.nbdserver("disk", "update", "mv-default-sub", "--des", "des-rot"))
    assert "cmk-no-subscription-move" in err

    w = Writer(stack, "mv1", span=4 << 20)
    w.start()
    try:
        wait_until(lambda: w.count > 10 or w.error, 20, what="the writer to run")
        moved = stack.nbdserver("disk", "update", "mv1", "--des", "des-rot")
        assert moved["encryption"]["diskEncryptionSet"] == "des-rot"
        assert moved["encryption"]["keyVersion"] == c["version"]
        n = w.count
        wait_until(lambda: w.count > n + 10 or w.error, 20, what="I/O to go on after the move")
        assert w.error is None, w.error

        # Rotation: a new version, the set follows the versionless URL, DEKs are re-wrapped.
        new_kid = stack.keyservice("key", "rotate", "rot", "k1")["key"]["kid"]
        new_version = new_kid.rsplit("/", 1)[1]
        stack.nbdserver("des", "update", "des-rot", "--key-url", stack.key_url("rot", "k1"))
        shown = stack.disk("mv1")["encryption"]
        assert shown["keyVersion"] == new_version and shown["kid"] == new_kid
        n = w.count
        wait_until(lambda: w.count > n + 10 or w.error, 20, what="I/O to go on after rotation")
        assert w.error is None, w.error

        # Or pinned to an explicit new version.
        pinned = stack.keyservice("key", "rotate", "rot", "k1")["key"]["kid"]
        stack.nbdserver("des", "update", "des-rot", "--key-url", pinned)
        assert stack.disk("mv1")["encryption"]["kid"] == pinned
        stack.nbdserver("des", "update", "des-rot", "--key-url", new_kid)
        assert stack.disk("mv1")["encryption"]["kid"] == new_kid

        # The old version disabled: the disk no longer depends on it and keeps serving.
        seen = len(stack.keyservice("audit", "show", "rot")["value"])
        stack.keyservice("key", "disable", "rot", "k1", "--version", c["version"])
        wait_until(lambda: _checked_since(stack, "rot", seen, c["object_id"], new_version), 20,
                   what="a key check after the old version was disabled")
        n = w.count
        wait_until(lambda: w.count > n + 10 or w.error, 20, what="I/O after the old version is off")
        assert w.error is None, w.error
        assert stack.disk("mv1")["serving"]["state"] == "available"

        # And it really is under the customer's key now: disabling its version locks it.
        stack.keyservice("key", "disable", "rot", "k1", "--version", new_version)
        wait_until(lambda: w.error is not None, 10, what="the writer's EIO")
        stack.keyservice("key", "enable", "rot", "k1", "--version", new_version)
        w.stop()
        wait_for_io(w.h)
        w.verify()
    finally:
        w.close()

    back = stack.nbdserver("disk", "update", "mv1", "--platform-key")
    assert back["encryption"]["type"] == "EncryptionAtRestWithPlatformKey"


def _checked_since(stack, vault, seen, object_id, version) -> bool:
    """The set's identity unwrapped with `version` after audit entry number `seen`."""
    entries = stack.keyservice("audit", "show", vault)["value"][seen:]
    return any(e.get("caller") == object_id and e.get("operation", "").startswith("KeyUnwrap")
               and version in (e.get("kid") or "") and e.get("status") == 200 for e in entries)


def test_snapshot_image_and_scale_set(stack):
    c = stack.customer_key("snapv", "k1", "des-snap")
    stack.customer_key("snapv2", "k1", "des-snap2")
    d = stack.create_disk("src1", "--size", "16M", "--des", "des-snap")
    h = stack.connect("src1")
    a, b = pattern(0xA, 2 << 20), pattern(0xB, 2 << 20)
    h.pwrite(a, 0)
    h.flush()

    # A snapshot of the attached disk while another client writes elsewhere on it.
    w = Writer(stack, "src1", base=8 << 20, span=4 << 20)
    w.start()
    try:
        wait_until(lambda: w.count > 10 or w.error, 20, what="the writer to run")
        snap = stack.nbdserver("snapshot", "create", "snap1", "--disk", "src1", "--quiet")
        n = w.count
        wait_until(lambda: w.count > n + 5 or w.error, 20, what="writes to go on after the snapshot")
    finally:
        w.stop()
    assert w.error is None, w.error  # held during the copy, never failed
    h.pwrite(b, 0)
    h.flush()
    assert snap["encryption"]["diskEncryptionSet"] == "des-snap"
    assert snap["encryption"]["kid"] == d["encryption"]["kid"]

    from_snap = stack.create_disk("fromsnap", "--source", "snapshot:snap1")
    assert from_snap["encryption"]["diskEncryptionSet"] == "des-snap"  # inherits the CMK
    h2 = stack.connect("fromsnap")
    assert h2.pread(len(a), 0) == a  # as of the snapshot, not the later write B
    h2.shutdown()

    img = stack.nbdserver("image", "create", "img1", "--source", "snapshot:snap1", "--quiet")
    assert img["encryption"]["diskEncryptionSet"] == "des-snap"
    err = _refused(lambda: stack.nbdserver("image", "share", "img1", "--gallery", "g1"))
    assert "cmk-image-no-gallery" in err
    err = _refused(lambda: stack.create_disk("x1", "--source", "image:img1", "--des", "des-snap2"))
    assert "cmk-source-same-key" in err
    err = _refused(lambda: stack.create_disk("x2", "--source", "image:img1",
                                             "--subscription", "sub2"))
    assert "cmk-same-subscription" in err

    # A PMK image may be shared.
    stack.create_disk("pmksrc", "--size", "16M")
    stack.nbdserver("image", "create", "pmkimg", "--source", "disk:pmksrc", "--quiet")
    assert stack.nbdserver("image", "share", "pmkimg", "--gallery", "g1")["gallery"] == "g1"

    # A scale set: 3 disks with the image's data, each its own DEK.
    made = stack.create_disk("ss", "--count", "3", "--source", "image:img1")
    assert [m["name"] for m in made] == ["ss-0", "ss-1", "ss-2"]
    wrapped = {stack.nbdserver("disk", "key-envelope", m["name"])["value"] for m in made}
    wrapped.add(stack.nbdserver("disk", "key-envelope", "src1")["value"])
    assert len(wrapped) == 4
    deks = {stack.dek(m["name"]) for m in made} | {stack.dek("src1")}
    assert len(deks) == 4  # distinct DEKs, not only distinct wrappings of one
    for m in made:
        assert m["encryption"]["diskEncryptionSet"] == "des-snap"
        hh = stack.connect(m["name"])
        assert hh.pread(len(a), 0) == a
        hh.shutdown()

    # The scale set follows the set's key like any disk.
    hh = stack.connect("ss-1")
    stack.keyservice("key", "disable", "snapv", "k1")
    wait_for_eio(hh)
    wait_for_eio(h)
    stack.keyservice("key", "enable", "snapv", "k1")
    wait_for_io(hh)
    wait_for_io(h)
    assert h.pread(len(b), 0) == b
    hh.shutdown()
    h.shutdown()
    assert c["des"] == "des-snap"


def test_deletion_rules(stack):
    stack.customer_key("delv", "k1", "des-del")
    stack.create_disk("del1", "--size", "16M", "--des", "des-del")
    stack.nbdserver("snapshot", "create", "del1-snap", "--disk", "del1", "--quiet")
    h = stack.connect("del1")
    err = _refused(lambda: stack.nbdserver("disk", "delete", "del1"))
    assert "attached" in err and "HTTP 409" in err
    err = _refused(lambda: stack.nbdserver("des", "delete", "des-del"))
    assert "del1" in err and "HTTP 409" in err

    stack.nbdserver("disk", "delete", "del1", "--force")
    wait_for_eio(h)
    h.shutdown()
    err = _refused(lambda: stack.nbdserver("des", "delete", "des-del"))
    assert "del1-snap" in err  # the snapshot still uses the set
    stack.nbdserver("snapshot", "delete", "del1-snap")
    stack.nbdserver("des", "delete", "des-del")
    err = _refused(lambda: stack.disk("del1"))
    assert "HTTP 404" in err


def test_move_to_a_set_lacking_unwrapkey_is_refused(stack):
    """A set whose identity may wrap but not unwrap cannot take a disk: the move would
    succeed and the disk lock at its next check."""
    c = stack.customer_key("halfv", "k1", "des-half", grant=False)
    stack.grant("halfv", c["object_id"], "get,wrapKey")
    stack.create_disk("half1", "--size", "16M", "--subscription", "sub1")
    err = _refused(lambda: stack.nbdserver("disk", "update", "half1", "--des", "des-half"))
    assert "unwrapKey" in err and "HTTP 403" in err
    shown = stack.disk("half1")
    assert shown["encryption"]["type"] == "EncryptionAtRestWithPlatformKey"
    assert shown["serving"]["state"] == "available"


def test_concurrent_creates_of_one_name(stack):
    """Two requests for the same disk (or set) name at once: one wins, the other is a 409,
    and the winner is intact (its record, its export, its key)."""
    import threading

    stack.customer_key("racev", "k1", "des-race")
    for i in range(3):
        name, results = f"race{i}", []
        body = {"name": name, "size": "16M", "diskEncryptionSet": "des-race"}
        threads = [threading.Thread(target=lambda: results.append(stack.api("POST", "/disks", body)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcomes = []
        for status, out in results:
            if status == 202:
                op = wait_until(lambda: (lambda o: o if o["status"] != "running" else None)(
                    stack.api("GET", f"/operations/{out['id']}")[1]), 60, interval=0.05)
                outcomes.append(409 if op["status"] == "failed" and op["error"]["status"] == 409
                                else (200 if op["status"] == "succeeded" else op["error"]))
            else:
                outcomes.append(status)
        assert sorted(outcomes) == [200, 409], outcomes
        h = stack.connect(name)
        h.pwrite(pattern(i, 4096), 0)
        assert h.pread(4096, 0) == pattern(i, 4096)
        h.shutdown()
        assert stack.disk(name)["serving"]["state"] == "available"

    results = []
    body = {"name": "des-dup", "keyUrl": stack.key_url("racev", "k1")}
    threads = [threading.Thread(target=lambda: results.append(stack.api("POST", "/encryption-sets", body)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _ in results) == [201, 409], results
    winner = next(out for s, out in results if s == 201)
    assert stack.nbdserver("des", "show", "des-dup")["identity"] == winner["identity"]


def test_rotation_during_a_copy_reaches_the_new_volume(stack):
    """A rotation while a disk is being made from a snapshot re-wraps the new disk's DEK
    too: when both are done, it is on the new version (so the old one can be retired)."""
    import os

    stack.customer_key("rotcopy", "k1", "des-rotcopy")
    stack.create_disk("rc-src", "--size", "512M", "--des", "des-rotcopy")
    h = stack.connect("rc-src")
    chunk = os.urandom(8 << 20)  # real data everywhere: the copy takes a while
    for i in range(64):
        h.pwrite(chunk, i * len(chunk))
    h.flush()
    h.shutdown()
    stack.nbdserver("snapshot", "create", "rc-snap", "--disk", "rc-src", "--quiet")
    status, op = stack.api("POST", "/disks", {"name": "rc-copy", "source": "snapshot:rc-snap"})
    assert status == 202, op
    new_kid = stack.keyservice("key", "rotate", "rotcopy", "k1")["key"]["kid"]
    stack.nbdserver("des", "update", "des-rotcopy", "--key-url", stack.key_url("rotcopy", "k1"))
    if stack.api("GET", f"/operations/{op['id']}")[1]["status"] != "running":
        pytest.skip("the copy finished before the rotation; nothing to check this time")
    wait_until(lambda: stack.api("GET", f"/operations/{op['id']}")[1]["status"] != "running",
               120, interval=0.05, what="the copy")
    assert stack.api("GET", f"/operations/{op['id']}")[1]["status"] == "succeeded"
    for name in ("rc-src", "rc-copy"):
        assert stack.disk(name)["encryption"]["kid"] == new_kid, name
    assert stack.nbdserver("snapshot", "show", "rc-snap")["encryption"]["kid"] == new_kid
    for name in ("rc-copy", "rc-src"):
        stack.nbdserver("disk", "delete", name)
    stack.nbdserver("snapshot", "delete", "rc-snap")
