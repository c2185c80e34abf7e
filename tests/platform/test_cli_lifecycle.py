"""A disk's life from the command line: grow it, see its usage, sizes in the forms people
type, and long operations followed, left (--no-wait), listed and found again after a
restart.

Real parts: both daemons as processes, the `nbdserver` CLI as a subprocess, libnbd as
the NBD client that sees a disk's size and data.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import time

import pytest

from tests.helpers.platform import CliFailed, pattern
from tests.helpers.servers import wait_until

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
    # Attached: the client agreed to 16 MiB at its handshake, so the disk does not move.
    err = _refused(lambda: nb("disk", "resize", "grow1", "--size", "32M"))
    assert err.returncode == 1 and "attached" in err.stderr and _last_error(err)["status"] == 409
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
