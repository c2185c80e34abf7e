"""Double encryption at rest (issue 18): an `EncryptionAtRestWithPlatformAndCustomerKeys`
set gives each disk two DEKs, one wrapped by the platform key and one by the customer's,
and every sector is encrypted under both.

The oracle is independent of the server: the raw file, read after a FLUSH, decrypted
sector by sector with `cryptography`'s AES-XTS, first with the customer DEK and then with
the platform DEK, both unwrapped in-test by the vaults' admin (docs/format.md, "Double
encryption"). Then: the platform DEK alone reads nothing; revoking the customer's key
fails I/O within a deadline; snapshots, images and disks made from them read back;
rotation re-wraps the customer DEK only; moves keep the number of layers; and a
connection handed to an I/O worker process reads and writes the same bytes.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.helpers.platform import (
    CliFailed,
    Stack,
    connect_refused,
    pattern,
    wait_for_eio,
    wait_for_io,
)
from tests.helpers.servers import wait_until
from tests.platform.conftest import STATES, _finish

S = 4096
DOUBLE = "EncryptionAtRestWithPlatformAndCustomerKeys"


@pytest.fixture(scope="module", params=STATES)
def state(request):
    """Both state engines: the platform envelope and the set's type are new columns."""
    return request.param


def xts_decrypt(key: bytes, sector: int, data: bytes) -> bytes:
    d = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little"))).decryptor()
    return d.update(data) + d.finalize()


def double_set(stack: Stack, vault: str, des: str) -> dict:
    c = stack.customer_key(vault, "k1")
    shown = stack.nbdserver("des", "create", des, "--key-url", stack.key_url(vault, "k1"),
                            "--double-encryption")
    assert shown["encryptionType"] == DOUBLE
    stack.grant(vault, shown["identity"]["objectId"])
    return {**c, "des": des, "object_id": shown["identity"]["objectId"]}


def _unwrap(stack: Stack, env: dict) -> bytes:
    vault, key, version = env["kid"].split("/vaults/", 1)[1].replace("/keys/", "/").split("/")
    out = stack.keyservice("key", "unwrap", vault, key, "--version", version,
                           "--value", env["value"], "--alg", env["alg"])
    return base64.urlsafe_b64decode(out["value"] + "=" * (-len(out["value"]) % 4))


def deks(stack: Stack, disk: str) -> tuple[bytes, bytes]:
    """(platform DEK, customer DEK), unwrapped by the admin of each vault."""
    env = stack.nbdserver("disk", "key-envelope", disk)
    assert "two stacked" in env["format"]
    return _unwrap(stack, env["platform"]), _unwrap(stack, env)


def raw_file(stack: Stack, disk: str) -> bytes:
    return (Path(stack.nb_dir) / stack.disk(disk)["file"]).read_bytes()


def decrypt_file(raw: bytes, outer: bytes, inner: bytes | None) -> bytes:
    """Sector by sector: the outer layer's decryption, then (if given) the inner one's.
    Holes (all-zero sectors) stay zeros, as the server reads them."""
    out = bytearray()
    for s in range(len(raw) // S):
        sector = raw[s * S:(s + 1) * S]
        if sector == bytes(S):
            out += sector
            continue
        sector = xts_decrypt(outer, s, sector)
        out += xts_decrypt(inner, s, sector) if inner is not None else sector
    return bytes(out)


def _refused(call) -> str:
    with pytest.raises(CliFailed) as e:
        call()
    return e.value.stderr


def test_two_independent_layers_on_disk(stack):
    double_set(stack, "dbl-fmt", "des-dbl-fmt")
    d = stack.create_disk("dbl1", "--size", "1M", "--des", "des-dbl-fmt")
    enc = d["encryption"]
    assert enc["type"] == DOUBLE and enc["diskEncryptionSet"] == "des-dbl-fmt"
    assert "/vaults/dbl-fmt/keys/k1/" in enc["kid"]
    assert "/vaults/nbd-platform/keys/" in enc["platformKid"]

    h = stack.connect("dbl1")
    a, b = pattern(1, 3 * S), pattern(2, 1024)
    h.pwrite(a, 5 * S)
    h.pwrite(b, 40 * S + 512)  # part of a sector: the layer's read-modify-write
    h.pwrite(pattern(3, 256 * 1024), 512 * 1024)  # a staged (large) write
    h.flush()
    assert h.pread(len(a), 5 * S) == a and h.pread(len(b), 40 * S + 512) == b
    h.shutdown()

    platform_dek, customer_dek = deks(stack, "dbl1")
    assert platform_dek != customer_dek and len(platform_dek) == len(customer_dek) == 64
    raw = raw_file(stack, "dbl1")
    plain = decrypt_file(raw, customer_dek, platform_dek)
    assert plain[5 * S:8 * S] == a
    assert plain[40 * S + 512:40 * S + 1536] == b
    assert plain[40 * S:40 * S + 512] == bytes(512)
    assert plain[512 * 1024:768 * 1024] == pattern(3, 256 * 1024)
    # The platform DEK alone (as a single layer, either way round) reads nothing, and
    # neither does the customer's.
    assert a[:S] not in decrypt_file(raw, platform_dek, None)
    assert a[:S] not in decrypt_file(raw, customer_dek, None)
    assert a[:S] not in decrypt_file(raw, platform_dek, customer_dek)


def test_revoking_the_customer_key_locks_the_disk(stack):
    double_set(stack, "dbl-rev", "des-dbl-rev")
    stack.create_disk("dblrev", "--size", "1M", "--des", "des-dbl-rev")
    h = stack.connect("dblrev")
    h.pwrite(pattern(4, S), 0)
    stack.keyservice("key", "disable", "dbl-rev", "k1")
    wait_for_eio(h, timeout=5)  # the change stream's poke: well within the deadline
    stack.wait_serving("dblrev", "locked")
    stack.keyservice("key", "enable", "dbl-rev", "k1")
    stack.wait_serving("dblrev")
    wait_for_io(h)
    assert h.pread(S, 0) == pattern(4, S)
    h.shutdown()


def test_snapshot_image_disk_from_snapshot_and_rotation(stack):
    double_set(stack, "dbl-snap", "des-dbl-snap")
    stack.create_disk("dblsrc", "--size", "1M", "--des", "des-dbl-snap")
    h = stack.connect("dblsrc")
    a = pattern(5, 64 * 1024)
    h.pwrite(a, 0)
    snap = stack.nbdserver("snapshot", "create", "dblsnap", "--disk", "dblsrc", "--quiet")
    h.pwrite(pattern(6, 64 * 1024), 0)  # after the snapshot
    h.shutdown()
    assert snap["encryption"]["type"] == DOUBLE

    img = stack.nbdserver("image", "create", "dblimg", "--source", "snapshot:dblsnap", "--quiet")
    assert img["encryption"]["type"] == DOUBLE
    err = _refused(lambda: stack.nbdserver("image", "share", "dblimg", "--gallery", "g1"))
    assert "cmk-image-no-gallery" in err

    for source, name in (("snapshot:dblsnap", "dblfromsnap"), ("image:dblimg", "dblfromimg")):
        made = stack.create_disk(name, "--source", source)
        assert made["encryption"]["type"] == DOUBLE
        hh = stack.connect(name)
        assert hh.pread(len(a), 0) == a
        hh.shutdown()
        # A disk made from a copy has two fresh DEKs of its own.
        assert set(deks(stack, name)).isdisjoint(deks(stack, "dblsrc"))

    # Rotation re-wraps the customer DEK; the platform DEK's envelope stays as it was.
    before = stack.nbdserver("disk", "key-envelope", "dblsrc")
    before_deks = deks(stack, "dblsrc")
    new_kid = stack.keyservice("key", "rotate", "dbl-snap", "k1")["key"]["kid"]
    stack.nbdserver("des", "update", "des-dbl-snap", "--key-url", new_kid)
    after = stack.nbdserver("disk", "key-envelope", "dblsrc")
    assert after["kid"] == new_kid and after["value"] != before["value"]
    assert after["platform"] == before["platform"]
    assert deks(stack, "dblsrc") == before_deks
    assert stack.nbdserver("snapshot", "show", "dblsnap")["encryption"]["kid"] == new_kid
    hh = stack.connect("dblsrc")
    assert hh.pread(64 * 1024, 0) == pattern(6, 64 * 1024)
    hh.shutdown()
    hh = stack.connect("dblfromsnap")
    assert hh.pread(len(a), 0) == a
    hh.shutdown()


def test_a_damaged_source_is_refused_and_its_deks_wiped(stack):
    """A disk made from a snapshot whose file is no longer whole sectors (damaged or cut
    storage): the copy is refused by name, and the source's two DEKs, unwrapped for it,
    do not stay in the server's memory (nor does the source file stay open)."""
    from tests.platform.test_platform_revocation import _memory_hits

    double_set(stack, "dbl-cut", "des-dbl-cut")
    stack.create_disk("dblcut", "--size", "1M", "--des", "des-dbl-cut")
    before = set((Path(stack.nb_dir) / "snapshots").iterdir())
    stack.nbdserver("snapshot", "create", "dblcutsnap", "--disk", "dblcut", "--quiet")
    (snap_file,) = set((Path(stack.nb_dir) / "snapshots").iterdir()) - before
    os.truncate(snap_file, 1024 * 1024 - 100)

    err = _refused(lambda: stack.create_disk("dblcutcopy", "--source", "snapshot:dblcutsnap"))
    assert "HTTP 409" in err and "dblcutsnap" in err and "4096" in err, err
    status, _ = stack.api("GET", "/disks/dblcutcopy")
    assert status == 404
    fds = Path(f"/proc/{stack.nb.pid}/fd")
    assert not any(os.path.realpath(fd) == str(snap_file) for fd in fds.iterdir())
    if os.geteuid() == 0:
        platform_dek, customer_dek = deks(stack, "dblcut")
        assert _memory_hits(stack.nb.pid, {"platform": platform_dek, "customer": customer_dek}) == {}
    stack.nbdserver("snapshot", "delete", "dblcutsnap")


def test_a_disk_that_cannot_be_opened_is_refused_with_its_deks_wiped(make_stack):
    """A disk whose storage this server cannot reach at attach (here: a disk on Ceph RBD,
    and the server restarted without a cluster; the row is pointed at an image while it is
    stopped, as no cluster runs here). Both DEKs were unwrapped for the attach: they are
    wiped, and the client is refused as for a file that cannot be opened, the server's log
    without a traceback (make_stack's end checks it)."""
    import sqlite3

    from tests.platform.test_platform_revocation import _memory_hits

    stack = make_stack()
    double_set(stack, "dbl-gone", "des-dbl-gone")
    stack.create_disk("dblgone", "--size", "1M", "--des", "des-dbl-gone")
    platform_dek, customer_dek = deks(stack, "dblgone")
    stack.stop_nbdserver()
    db = sqlite3.connect(Path(stack.nb_dir) / "platform.db")
    with db:
        db.execute("UPDATE volumes SET path='rbd:pool1/dblgone' WHERE name='dblgone'")
    db.close()
    stack.start_nbdserver()
    assert connect_refused(stack, "dblgone") is not None
    if os.geteuid() == 0:
        assert _memory_hits(stack.nb.pid, {"platform": platform_dek, "customer": customer_dek}) == {}


def test_a_dek_the_engine_refuses_is_wiped_and_the_attach_refused(make_stack):
    """A key service that unwraps a disk's envelope to a DEK with equal halves (faulty or
    hostile: the engine refuses such a key, IEEE 1619). The attach is refused as for a
    disk that cannot be opened, the DEK is wiped, and the server logs no traceback
    (make_stack's end checks it). The envelope is replaced while the server is stopped."""
    import sqlite3

    from tests.platform.test_platform_revocation import _memory_hits

    stack = make_stack()
    c = stack.customer_key("halves", "k1", "des-halves")
    stack.create_disk("halves", "--size", "1M", "--des", "des-halves")
    bad = os.urandom(32) * 2
    value = base64.urlsafe_b64encode(bad).rstrip(b"=").decode()
    wrapped = stack.keyservice("key", "wrap", "halves", "k1", "--version", c["version"], "--value", value)
    stack.stop_nbdserver()
    db = sqlite3.connect(Path(stack.nb_dir) / "platform.db")
    with db:
        db.execute("UPDATE volumes SET kid=?, wrapped=? WHERE name='halves'", (
            wrapped["kid"], base64.urlsafe_b64decode(wrapped["value"] + "=" * (-len(wrapped["value"]) % 4))))
    db.close()
    stack.start_nbdserver()
    assert connect_refused(stack, "halves") is not None
    if os.geteuid() == 0:
        assert _memory_hits(stack.nb.pid, {"dek": bad}) == {}


def test_automatic_rotation_rewraps_the_customer_dek_only(stack):
    stack.customer_key("dbl-auto", "k1")
    shown = stack.nbdserver("des", "create", "des-dbl-auto", "--double-encryption", "--auto-rotate",
                            "--key-url", stack.key_url("dbl-auto", "k1"))
    stack.grant("dbl-auto", shown["identity"]["objectId"])
    stack.create_disk("dblauto", "--size", "1M", "--des", "des-dbl-auto")
    h = stack.connect("dblauto")
    h.pwrite(pattern(12, S), 0)
    before = stack.nbdserver("disk", "key-envelope", "dblauto")
    new_kid = stack.keyservice("key", "rotate", "dbl-auto", "k1")["key"]["kid"]
    wait_until(lambda: stack.nbdserver("disk", "key-envelope", "dblauto")["kid"] == new_kid, 20,
               what="the set to follow its key's new version")
    assert stack.nbdserver("disk", "key-envelope", "dblauto")["platform"] == before["platform"]
    assert h.pread(S, 0) == pattern(12, S)
    h.shutdown()


def test_moves_keep_the_number_of_layers(stack):
    double_set(stack, "dbl-mv", "des-dbl-mv")
    double_set(stack, "dbl-mv2", "des-dbl-mv2")
    stack.customer_key("dbl-cmk", "k1", "des-dbl-cmk")
    stack.create_disk("dblmv", "--size", "1M", "--des", "des-dbl-mv")
    stack.create_disk("pmkmv", "--size", "1M", "--subscription", "sub1")
    stack.create_disk("cmkmv", "--size", "1M", "--des", "des-dbl-cmk")
    for disk, target in (("dblmv", ["--platform-key"]), ("dblmv", ["--des", "des-dbl-cmk"]),
                         ("pmkmv", ["--des", "des-dbl-mv"]), ("cmkmv", ["--des", "des-dbl-mv"])):
        err = _refused(lambda: stack.nbdserver("disk", "update", disk, *target))
        assert "double-same-layers" in err, err
    assert stack.disk("pmkmv")["encryption"]["type"] == "EncryptionAtRestWithPlatformKey"

    # The documented way there: a re-encrypting copy of a platform-managed snapshot.
    h = stack.connect("pmkmv")
    h.pwrite(pattern(9, 2 * S), 3 * S)
    h.shutdown()
    stack.nbdserver("snapshot", "create", "pmkmv-snap", "--disk", "pmkmv", "--quiet")
    made = stack.create_disk("pmkmv-dbl", "--source", "snapshot:pmkmv-snap", "--des", "des-dbl-mv")
    assert made["encryption"]["type"] == DOUBLE
    platform_dek, customer_dek = deks(stack, "pmkmv-dbl")
    plain = decrypt_file(raw_file(stack, "pmkmv-dbl"), customer_dek, platform_dek)
    assert plain[3 * S:5 * S] == pattern(9, 2 * S)

    h = stack.connect("dblmv")
    h.pwrite(pattern(7, S), 0)
    h.flush()
    platform_dek = deks(stack, "dblmv")[0]
    moved = stack.nbdserver("disk", "update", "dblmv", "--des", "des-dbl-mv2")
    assert moved["encryption"]["diskEncryptionSet"] == "des-dbl-mv2"
    assert moved["encryption"]["type"] == DOUBLE
    assert deks(stack, "dblmv")[0] == platform_dek
    assert h.pread(S, 0) == pattern(7, S)
    # Now under the second set's key: revoking it locks the disk.
    stack.keyservice("key", "disable", "dbl-mv2", "k1")
    wait_for_eio(h, timeout=5)
    stack.keyservice("key", "enable", "dbl-mv2", "k1")
    h.shutdown()


def test_both_envelopes_survive_a_restart(stack):
    double_set(stack, "dbl-rst", "des-dbl-rst")
    stack.create_disk("dblrst", "--size", "1M", "--des", "des-dbl-rst")
    h = stack.connect("dblrst")
    h.pwrite(pattern(10, 2 * S), S)
    h.shutdown()
    before = stack.nbdserver("disk", "key-envelope", "dblrst")
    stack.restart_nbdserver()
    assert stack.nbdserver("disk", "key-envelope", "dblrst") == before
    assert stack.nbdserver("des", "show", "des-dbl-rst")["encryptionType"] == DOUBLE
    h = stack.connect("dblrst")
    assert h.pread(2 * S, S) == pattern(10, 2 * S)
    h.shutdown()


def test_platform_key_refusing_is_no_revocation(stack):
    """The platform key refusing a disk's platform DEK: the disk does not open (nothing
    reads with the customer DEK alone), but it is not locked as revoked, which would
    send the platform rechecking the customer's set."""
    double_set(stack, "dbl-pk", "des-dbl-pk")
    stack.create_disk("dblpk", "--size", "1M", "--des", "des-dbl-pk")
    platform_key = stack.disk("dblpk")["encryption"]["platformKid"].split("/keys/")[1].split("/")[0]
    stack.keyservice("key", "disable", "nbd-platform", platform_key)
    try:
        assert connect_refused(stack, "dblpk") is not None
        assert stack.serving_state("dblpk") == "available"
        assert "platform key refused" in stack.nb.stderr_text()
    finally:
        stack.keyservice("key", "enable", "nbd-platform", platform_key)
    h = wait_until(lambda: _connected(stack, "dblpk"), 10, what="the disk to open again")
    h.pwrite(pattern(11, S), 0)
    assert h.pread(S, 0) == pattern(11, S)
    h.shutdown()


def _connected(stack: Stack, disk: str):
    import nbd
    try:
        return stack.connect(disk)
    except nbd.Error:
        return None


def test_unknown_set_type_is_a_400(stack):
    c = stack.customer_key("dbl-bad", "k1")
    status, body = stack.api("POST", "/encryption-sets", {
        "name": "des-dbl-bad", "keyUrl": stack.key_url("dbl-bad", "k1"),
        "encryptionType": "EncryptionAtRestWithPlatformKey"})
    assert status == 400 and "encryptionType" in str(body), (status, body)
    status, body = stack.api("POST", "/encryption-sets", {
        "name": "des-dbl-bad", "keyUrl": stack.key_url("dbl-bad", "k1"), "encryptionType": 2})
    assert status == 400, (status, body)
    assert c["vault"] == "dbl-bad"


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory):
    from tests.platform.test_platform_ioworkers import IO_PROCESSES, wait_workers_ready
    s = Stack(tmp_path_factory.mktemp("double-ioworkers"), nbd_args=IO_PROCESSES).start()
    wait_workers_ready(s)
    yield s
    _finish(s)


def test_io_workers_get_both_deks_and_wipe_both(worker_stack):
    from tests.platform.test_platform_ioworkers import ROOT, connect_on_new_worker, workers
    from tests.platform.test_platform_revocation import _memory_hits

    stack = worker_stack
    double_set(stack, "dbl-iow", "des-dbl-iow")
    stack.create_disk("dbliow", "--size", "4M", "--des", "des-dbl-iow")
    a, pa = connect_on_new_worker(stack, "dbliow")
    b, pb = connect_on_new_worker(stack, "dbliow")
    assert {pa, pb} == set(workers(stack))
    data = os.urandom(256 * 1024)
    a.pwrite(data, 0)
    b.pwrite(pattern(8, 1024), 300 * 1024 + 512)
    a.flush()
    b.flush()
    assert b.pread(len(data), 0) == data
    assert a.pread(1024, 300 * 1024 + 512) == pattern(8, 1024)
    platform_dek, customer_dek = deks(stack, "dbliow")
    plain = decrypt_file(raw_file(stack, "dbliow"), customer_dek, platform_dek)
    assert plain[:len(data)] == data
    assert plain[300 * 1024 + 512:300 * 1024 + 1536] == pattern(8, 1024)

    needles = {"platform": platform_dek, "customer": customer_dek}
    if ROOT:
        for pid in (pa, pb):
            assert set(_memory_hits(pid, needles)) == {"platform", "customer"}
    stack.keyservice("key", "disable", "dbl-iow", "k1")
    wait_for_eio(a, timeout=5)
    wait_for_eio(b, timeout=5)
    if ROOT:
        for pid in (stack.nb.pid, pa, pb):
            wait_until(lambda pid=pid: _memory_hits(pid, needles) == {}, 5,
                       what=f"both DEKs to be wiped from process {pid}")
    a.shutdown()
    b.shutdown()
    stack.keyservice("key", "enable", "dbl-iow", "k1")
