"""A disk's life from the command line: grow it (unattached, and online under clients in
the main process and on I/O workers, through a kill -9), see its usage, sizes in the
forms people type, and long operations followed, left (--no-wait), listed and found
again after a restart.

Real parts: both daemons as processes, the `nbdserver` CLI as a subprocess, libnbd as
the NBD client that sees a disk's size and data.
"""

from __future__ import annotations

import errno
import json
import re
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.helpers.platform import CliFailed, Writer, pattern
from tests.helpers.servers import wait_until
from tests.platform.test_platform_ioworkers import connect_on_new_worker, wait_workers_ready, workers

MiB = 1 << 20
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _refused(call) -> CliFailed:
    with pytest.raises(CliFailed) as e:
        call()
    return e.value


def _last_error(err: CliFailed) -> dict:
    return json.loads(err.stderr.strip().splitlines()[-1])["error"]


def test_a_disk_grows_for_the_next_client_and_never_shrinks(stack):
    nb = stack.nbdserver
    stack.create_disk("grow1", "--size", "16M")
    h = stack.connect("grow1")
    h.pwrite(pattern(7, MiB), 15 * MiB)
    h.shutdown()
    wait_until(lambda: stack.disk("grow1")["diskState"] == "Unattached", what="grow1 detached")

    shown = nb("disk", "resize", "grow1", "--size", "32M")
    assert shown["size"] == 32 * MiB
    assert stack.disk("grow1")["size"] == 32 * MiB
    h = stack.connect("grow1")
    assert h.get_size() == 32 * MiB
    assert h.pread(MiB, 15 * MiB) == pattern(7, MiB)  # the data stays
    assert h.pread(MiB, 31 * MiB) == bytes(MiB)  # the new end reads as zeros
    h.pwrite(pattern(8, MiB), 31 * MiB)
    assert h.pread(MiB, 31 * MiB) == pattern(8, MiB)
    h.shutdown()
    wait_until(lambda: stack.disk("grow1")["diskState"] == "Unattached", what="grow1 detached")

    err = _refused(lambda: nb("disk", "resize", "grow1", "--size", "16M"))
    assert err.returncode == 1 and "only grows" in err.stderr and _last_error(err)["status"] == 400
    # Without the API's token nothing changes.
    r = stack._cli([sys.executable, "-m", "nbdserver.cli", "disk", "resize", "grow1", "--size", "64M"],
                   dict(stack.env, NBDSERVER_TOKEN="not-the-token"), False)
    assert r.returncode == 1 and "HTTP 401" in r.stderr
    assert stack.disk("grow1")["size"] == 32 * MiB
    h = stack.connect("grow1")
    assert h.get_size() == 32 * MiB and h.pread(MiB, 31 * MiB) == pattern(8, MiB)
    h.shutdown()


@pytest.fixture(scope="module")
def nbd_tls(tmp_path_factory):
    """NBD TLS files (`nbdserver tls init`): a TLS connection stays in the main process."""
    d = tmp_path_factory.mktemp("nbd-tls")
    subprocess.run([sys.executable, "-m", "nbdserver.cli", "tls", "init", str(d)], check=True,
                   capture_output=True)
    return d


def _tls_connect(stack, disk: str, tls_dir):
    import nbd
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(tls_dir))
    h.set_export_name(disk)
    host, port = stack.nb.nbd_address.rsplit(":", 1)
    h.connect_tcp(host, port)
    return h


def _allocation_aware(stack, disk: str):
    """A plain connection that negotiated base:allocation, for block status."""
    import nbd
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(stack.nbd_uri(disk))
    return h


def _nbd_errno(call) -> int:
    """The errno of a request the server refused. libnbd's own bounds check is off (see
    below), so what is seen is the server's answer."""
    import nbd
    with pytest.raises(nbd.Error) as e:
        call()
    return e.value.errnum  # .errno is the symbolic name


def test_a_disk_grows_online_under_its_clients(make_stack, nbd_tls):
    import nbd
    stack = make_stack(nbd_args=["--io-processes", "2", "--tls-mode", "optional",
                                 "--tls-dir", str(nbd_tls)])
    wait_workers_ready(stack)
    stack.create_disk("live1", "--size", "16M")
    # Attached before the grow: a plain connection on each worker (one of them writing
    # all along), and a TLS one, which the main process serves itself.
    old_plain, p1 = connect_on_new_worker(stack, "live1")
    writer, p2 = connect_on_new_worker(
        stack, "live1", connect=lambda d: Writer(stack, d, base=8 * MiB, span=4 * MiB))
    assert {p1, p2} == set(workers(stack)), "the disk is not held by both workers"
    old_tls, p3 = connect_on_new_worker(stack, "live1", connect=lambda d: _tls_connect(stack, d, nbd_tls))
    assert p3 == stack.nb.pid, "the TLS connection left the main process"
    for h in (old_plain, old_tls):
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
    old_plain.pwrite(pattern(1, MiB), 0)
    old_tls.pwrite(pattern(2, MiB), MiB)
    writer.start()
    wait_until(lambda: writer.count >= 20 or writer.error, 30, what="the writer under way")

    assert stack.nbdserver("disk", "resize", "live1", "--size", "32M")["size"] == 32 * MiB
    done = writer.count
    wait_until(lambda: writer.count >= done + 20 or writer.error, 30, what="writes after the grow")
    assert writer.error is None, writer.error
    for h, tag, at in ((old_plain, 1, 0), (old_tls, 2, MiB)):
        # Still the size it negotiated: past it, the spec's answers (NBD_EINVAL for a
        # read, NBD_ENOSPC for a write), in a worker and in the main process alike.
        assert h.get_size() == 16 * MiB
        assert h.pread(MiB, at) == pattern(tag, MiB)
        h.pwrite(pattern(tag + 10, 4096), at)
        assert h.pread(4096, at) == pattern(tag + 10, 4096)
        assert _nbd_errno(lambda h=h: h.pread(4096, 16 * MiB)) == errno.EINVAL
        assert _nbd_errno(lambda h=h: h.pwrite(bytes(4096), 16 * MiB)) == errno.ENOSPC
        assert h.pread(4096, 16 * MiB - 4096) is not None  # and the connection lives on

    # New connections see the new size: one on a worker that held the disk at 16 MiB
    # (both do), one in the main process; each writes at the grown end.
    new_plain, p4 = connect_on_new_worker(stack, "live1", connect=lambda d: _allocation_aware(stack, d))
    assert p4 in (p1, p2)
    new_tls = _tls_connect(stack, "live1", nbd_tls)
    for h, tag, at in ((new_plain, 3, 31 * MiB), (new_tls, 4, 30 * MiB)):
        assert h.get_size() == 32 * MiB
        assert h.pread(MiB, at) == bytes(MiB)  # holes: zeros through the XTS layer
        h.pwrite(pattern(tag, MiB), at)
        assert h.pread(MiB, at) == pattern(tag, MiB)
    assert new_tls.pread(MiB, 31 * MiB) == pattern(3, MiB)  # one disk across processes
    assert new_plain.pread(MiB, 30 * MiB) == pattern(4, MiB)
    assert new_plain.pread(4096, 0) == pattern(11, 4096)
    # The worker's copy itself grew: its block status covers the new end (data there).
    extents: list[int] = []
    new_plain.block_status(2 * MiB, 30 * MiB, lambda _c, _o, e, _err: extents.extend(e) or 0)
    assert sum(extents[0::2]) >= 2 * MiB and not any(extents[1::2]), extents
    new_plain.flush()
    writer.stop()
    assert writer.error is None, writer.error

    # kill -9 right after a resize answered: the new size and every byte are there.
    assert stack.nbdserver("disk", "resize", "live1", "--size", "48M")["size"] == 48 * MiB
    stack.stop_nbdserver(kill=True)
    stack.start_nbdserver()
    wait_workers_ready(stack)
    assert stack.disk("live1")["size"] == 48 * MiB
    h = stack.connect("live1")
    assert h.get_size() == 48 * MiB
    writer.verify(h)
    assert h.pread(MiB, 0) == pattern(11, 4096) + pattern(1, MiB)[4096:]
    assert h.pread(MiB, MiB) == pattern(12, 4096) + pattern(2, MiB)[4096:]
    assert h.pread(MiB, 30 * MiB) == pattern(4, MiB) and h.pread(MiB, 31 * MiB) == pattern(3, MiB)
    assert h.pread(MiB, 47 * MiB) == bytes(MiB)
    h.shutdown()


def test_disk_usage_counts_what_is_written(stack):
    stack.create_disk("use1", "--size", "64M")
    before = stack.nbdserver("disk", "usage", "use1")
    assert before["size"] == 64 * MiB and before["allocated"] < 4 * MiB, before
    h = stack.connect("use1")
    h.pwrite(pattern(3, 8 * MiB), 0)
    h.flush()
    h.shutdown()
    after = stack.nbdserver("disk", "usage", "use1")
    assert after["allocated"] >= 8 * MiB and after["allocatedPercent"] >= 12.5, after
    err = _refused(lambda: stack.nbdserver("disk", "usage", "nosuch"))
    assert _last_error(err)["status"] == 404


@pytest.mark.parametrize("given, size", [
    ("10MB", 10_002_432),  # decimal, rounded up to whole 4096-byte sectors
    ("10MiB", 10 * MiB),
    ("10M", 10 * MiB),
    ("1.5M", 1_572_864),
])
def test_sizes_in_the_forms_people_type(stack, given, size):
    name = f"sz-{given.replace('.', '-').lower()}"
    assert stack.create_disk(name, "--size", given)["size"] == size


@pytest.mark.parametrize("given", ["10 gigs", "1.5", "10XB", "4097"])
def test_a_size_in_no_known_form_is_refused_with_the_forms(stack, given):
    err = _refused(lambda: stack.nbdserver("disk", "create", "badsize", "--size", given))
    assert err.returncode == 1 and _last_error(err)["status"] == 400
    assert "10GiB (binary" in err.stderr and "10GB (decimal" in err.stderr, err.stderr


def test_an_operation_left_and_found_again(stack):
    nb = stack.nbdserver
    stack.create_disk("opsrc", "--size", "32M")
    h = stack.connect("opsrc")
    h.pwrite(pattern(5, 4 * MiB), 0)
    h.shutdown()
    op = nb("image", "create", "opimg", "--source", "disk:opsrc", "--no-wait")
    assert op["kind"] == "image.create" and op["status"] in ("running", "succeeded")
    assert op["bytesTotal"] == 32 * MiB and op["target"] == "image:opimg"
    r = stack._cli([sys.executable, "-m", "nbdserver.cli", "operation", "wait", op["id"]], stack.env, False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "opimg"
    assert f"operation {op['id']} (image.create): started" in r.stderr
    assert "image.create: 100%" in r.stderr  # plain lines off a terminal
    shown = nb("operation", "show", op["id"])
    assert shown["status"] == "succeeded" and shown["progress"] == 1.0
    assert shown["started"].endswith("Z") and shown["ended"].endswith("Z")  # RFC 3339
    assert op["id"] in [o["id"] for o in nb("operation", "list")]
    # The API itself gives both: epoch seconds, and RFC 3339 next to them.
    status, raw = stack.api("GET", f"/operations/{op['id']}")
    assert status == 200 and isinstance(raw["ended"], float) and RFC3339.match(raw["endTime"])
    assert RFC3339.match(raw["startTime"]) and raw["startTime"] <= raw["endTime"]
    status, disk = stack.api("GET", "/disks/opsrc")
    assert isinstance(disk["created"], float) and RFC3339.match(disk["timeCreated"])
    err = _refused(lambda: nb("operation", "show", "not-an-id"))
    assert err.returncode == 2 and "16 hexadecimal digits" in err.stderr
    err = _refused(lambda: nb("operation", "show", "0123456789abcdef"))
    assert err.returncode == 1 and _last_error(err)["status"] == 404


def test_an_operation_cut_by_a_restart_is_reported_interrupted(make_stack):
    stack = make_stack()
    done = stack.nbdserver("disk", "create", "before", "--size", "1M", "--no-wait")
    stack.nbdserver("operation", "wait", done["id"], "--quiet")
    stack.stop_nbdserver(kill=True)
    # What a kill -9 in the middle of a copy leaves in the state: the row written when the
    # operation started, never brought to its end.
    db = sqlite3.connect(stack.nb_dir / "platform.db")
    view = {"id": "00000000000000aa", "kind": "snapshot.create", "target": "snapshot:s1",
            "status": "running", "progress": 0.0, "bytesTotal": None, "started": time.time()}
    with db:
        db.execute("INSERT INTO operations VALUES (?,?,?,?,?,?)",
                   (view["id"], view["kind"], "running", view["started"], None, json.dumps(view)))
    db.close()
    stack.start_nbdserver(same_ports=True)
    shown = stack.nbdserver("operation", "show", "00000000000000aa")
    assert shown["status"] == "interrupted" and shown["error"]["code"] == "OperationInterrupted"
    assert RFC3339.match(shown["endTime"])
    r = stack._cli([sys.executable, "-m", "nbdserver.cli", "operation", "wait", "00000000000000aa"],
                   stack.env, False)
    assert r.returncode == 3 and "undone at the next start" in r.stderr, r.stderr
    # An operation that ended before the restart keeps its outcome.
    assert stack.nbdserver("operation", "show", done["id"])["status"] == "succeeded"
