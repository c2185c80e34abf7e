"""Two `nbdserver serve` sharing one platform: state in one PostgreSQL database, volume
files in one data directory (the shared storage of a real deployment), issue 15.

A disk created through one server is listed and exported by the other; exactly one
serves it (its lease, platform/leases.py): the other refuses its clients while the
holder lives; killed -9, the holder's disk is served by the other within the lease's
bound, every acknowledged write intact.
"""

from __future__ import annotations

import json
import time

import nbd
import pytest

from tests.helpers.platform import NbdServerProcess, _http, io_fails, pattern
from tests.helpers.servers import wait_until

psycopg = pytest.importorskip("psycopg")

LEASE = 3.0  # --disk-lease-seconds: short, so the takeover fits a test
TAKEOVER_BOUND = LEASE + 5.0  # the lease, plus one catalog sync and the client's retries


def _server_b(stack) -> NbdServerProcess:
    return NbdServerProcess(stack.workdir, stack.nb_dir, stack.ks, lease=stack.lease,
                            grace=stack.grace, extra_args=stack.nbd_args).start()


def _b_view(stack, b: NbdServerProcess, name: str):
    status, body = _http(b.api_url, "GET", f"/disks/{name}", token=stack.nb.token_file.read_text().strip())
    return body if status == 200 else None


def _connect(address: str, disk: str):
    h = nbd.NBD()
    h.connect_uri(f"nbd://{address}/{disk}")
    return h


def test_one_server_serves_a_disk_and_the_other_takes_over_after_a_kill(make_stack, postgres_dsn):
    stack = make_stack(nbd_args=["--state", postgres_dsn, "--disk-lease-seconds", str(LEASE)])
    b = _server_b(stack)
    try:
        stack.create_disk("shared1", "--size", "16M")
        # Made on A, known to B: listed at once (one state), exported at B's next sync.
        status, listed = _http(b.api_url, "GET", "/disks", token=stack.nb.token_file.read_text().strip())
        assert status == 200 and "shared1" in [d["name"] for d in listed["value"]], listed
        wait_until(lambda: (_b_view(stack, b, "shared1") or {}).get("serving"), timeout=10,
                   what="B exports the disk A made")

        data = pattern(0x5E1, 1 << 20)
        h = stack.connect("shared1")  # A takes the lease
        h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
        # B knows the disk but A holds it: B refuses, as for a disk it does not have.
        assert connect_refused_at(b.nbd_address, "shared1") is not None
        # Still refused once A has renewed its lease: A keeps it while it lives.
        first = _lease(postgres_dsn, "shared1")
        assert first is not None
        wait_until(lambda: _lease(postgres_dsn, "shared1")[1] > first[1], timeout=2 * LEASE,
                   what="A renews its lease")
        assert _lease(postgres_dsn, "shared1")[0] == first[0]
        assert connect_refused_at(b.nbd_address, "shared1") is not None

        stack.nb.kill()  # -9, with a client attached
        killed = time.monotonic()
        h2 = wait_until(lambda: _try_connect(b.nbd_address, "shared1"), timeout=TAKEOVER_BOUND,
                        interval=0.1, what="B serves the disk of the killed server")
        took = time.monotonic() - killed
        assert h2.pread(len(data), 0) == data  # every acknowledged write is there
        h2.shutdown()
        print(f"takeover: {took:.2f} s from the kill to the first read on B")
        assert took <= TAKEOVER_BOUND, took
    finally:
        b.kill()
    assert "Traceback" not in b.stderr_text(), b.stderr_text()[-4000:]


def test_a_delete_and_a_resize_through_one_server_reach_the_server_serving_the_disk(
        make_stack, postgres_dsn):
    """Disks served by B, deleted and grown through A: B closes the deleted one (its
    client's reads fail with EIO, new clients are refused; its file is gone) and tells
    new clients of the grown one its new size, each within a renewal period."""
    stack = make_stack(nbd_args=["--state", postgres_dsn, "--disk-lease-seconds", str(LEASE)])
    b = _server_b(stack)
    try:
        stack.create_disk("gone", "--size", "4M")
        stack.create_disk("grows", "--size", "4M")
        wait_until(lambda: all((_b_view(stack, b, n) or {}).get("serving") for n in ("gone", "grows")),
                   timeout=10, what="B exports both disks A made")
        data = pattern(0x6D1, 64 << 10)
        hg = _connect(b.nbd_address, "gone")  # B takes both leases
        hg.pwrite(data, 0, nbd.CMD_FLAG_FUA)
        hr = _connect(b.nbd_address, "grows")
        hr.pwrite(data, 0, nbd.CMD_FLAG_FUA)
        assert hr.get_size() == 4 << 20
        path = _disk_path(postgres_dsn, stack, "gone")

        assert stack.nbdserver("disk", "resize", "grows", "--size", "8M")["size"] == 8 << 20  # through A
        stack.nbdserver("disk", "delete", "gone")  # through A, which has no client of it
        assert not path.exists()

        bound = LEASE / 3 + 5  # one renewal period, plus the client's own time
        wait_until(lambda: io_fails(hg), timeout=bound, what="B closes the disk deleted through A")
        assert connect_refused_at(b.nbd_address, "gone") is not None
        wait_until(lambda: _size_at(b.nbd_address, "grows") == 8 << 20, timeout=bound,
                   what="B announces the size A gave the disk")
        assert hr.pread(len(data), 0) == data  # the attached client serves on, at its size
        hr.shutdown()
    finally:
        b.kill()
    assert "Traceback" not in b.stderr_text(), b.stderr_text()[-4000:]


def _size_at(address: str, disk: str) -> int | None:
    h = _try_connect(address, disk)
    if h is None:
        return None
    try:
        return h.get_size()
    finally:
        h.shutdown()


def connect_refused_at(address: str, disk: str) -> str | None:
    try:
        _connect(address, disk).shutdown()
    except nbd.Error as e:
        return e.string
    return None


def _try_connect(address: str, disk: str):
    try:
        return _connect(address, disk)
    except nbd.Error:
        return None



def _lease(dsn: str, disk: str):
    """(holder, expires) of the disk's lease row, read straight from the database."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT holder, expires FROM disk_leases WHERE name=%s", (disk,)).fetchone()


def test_a_restart_removes_only_what_a_dead_server_left_unfinished(make_stack, postgres_dsn):
    """B is making a disk (its row CREATING, named with B's server lease) when A restarts:
    A's start-up sweep leaves it, and removes one whose creator is gone; B's running
    operation stays running, a gone server's is interrupted. Once B is killed, its
    unfinished disk and its operation go the same way, within its lease and a renewal."""
    stack = make_stack(nbd_args=["--state", postgres_dsn, "--disk-lease-seconds", str(LEASE)])
    b = _server_b(stack)
    try:
        stack.create_disk("making", "--size", "4M")
        stack.create_disk("orphan", "--size", "4M")
        paths = {n: _disk_path(postgres_dsn, stack, n) for n in ("making", "orphan")}
        assert all(p.exists() for p in paths.values()), paths
        b_holder = _server_holder(postgres_dsn, b.proc.pid)
        # What a copy in progress on B looks like in the state (the copy itself takes
        # too little time to restart a server inside it).
        _mark_creating(postgres_dsn, "making", b_holder)
        _mark_creating(postgres_dsn, "orphan", "gone-host/1/00000000")
        _running_operation(postgres_dsn, "op-b", b_holder)
        _running_operation(postgres_dsn, "op-gone", "gone-host/1/00000000")

        stack.restart_nbdserver()

        assert _volume_state(postgres_dsn, "making") == "creating"
        assert paths["making"].exists()
        assert _operation_status(postgres_dsn, "op-b") == "running"
        wait_until(lambda: _volume_state(postgres_dsn, "orphan") is None and not paths["orphan"].exists(),
                   timeout=2 * LEASE, what="the unfinished disk of a gone server removed")
        assert _operation_status(postgres_dsn, "op-gone") == "interrupted"

        b.kill()
        wait_until(lambda: _volume_state(postgres_dsn, "making") is None and not paths["making"].exists(),
                   timeout=LEASE + LEASE / 3 + 5, what="A removes the killed B's unfinished disk")
        wait_until(lambda: _operation_status(postgres_dsn, "op-b") == "interrupted", timeout=LEASE,
                   what="A reports the killed B's operation interrupted")
    finally:
        b.kill()
    assert "Traceback" not in stack.nb.stderr_text(), stack.nb.stderr_text()[-4000:]


def _sql(dsn: str, query: str, params=()):
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def _disk_path(dsn: str, stack, name: str):
    (path,), = _sql(dsn, "SELECT path FROM volumes WHERE kind='disk' AND name=%s", (name,))
    return stack.nb_dir / path


def _server_holder(dsn: str, pid: int) -> str:
    (holder,), = _sql(dsn, "SELECT holder FROM server_leases WHERE holder LIKE %s", (f"%/{pid}/%",))
    return holder


def _mark_creating(dsn: str, name: str, creator: str) -> None:
    _sql(dsn, "UPDATE volumes SET state='creating' WHERE kind='disk' AND name=%s", (name,))
    _sql(dsn, "INSERT INTO volume_creators (kind, name, holder) VALUES ('disk', %s, %s)", (name, creator))


def _volume_state(dsn: str, name: str) -> str | None:
    rows = _sql(dsn, "SELECT state FROM volumes WHERE kind='disk' AND name=%s", (name,))
    return rows[0][0] if rows else None


def _running_operation(dsn: str, op_id: str, runner: str) -> None:
    view = json.dumps({"id": op_id, "kind": "snapshot.create", "status": "running", "started": time.time()})
    _sql(dsn, "INSERT INTO operations (id, kind, status, started, view) VALUES (%s, 'snapshot.create', "
         "'running', %s, %s)", (op_id, time.time(), view))
    _sql(dsn, "INSERT INTO operation_runners (id, holder) VALUES (%s, %s)", (op_id, runner))


def _operation_status(dsn: str, op_id: str) -> str | None:
    rows = _sql(dsn, "SELECT status FROM operations WHERE id=%s", (op_id,))
    return rows[0][0] if rows else None
