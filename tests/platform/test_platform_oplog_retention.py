"""The operation log forgets finished operations past its retention window or row cap,
at start and whenever an operation ends, and never a running one (platform/oplog.py).

Real parts: both daemons as processes, the platform API and the `nbdserver` CLI; the
state's `operations` table is written directly only to plant rows of other ages, as a
server that ran for weeks would have left them.
"""

from __future__ import annotations

import json
import sqlite3
import time

from nbdserver.platform.oplog import KEEP, RETENTION

DAY = 24 * 3600.0


def _plant(db_path, op_id: str, status: str, started: float, ended: float | None) -> None:
    view = {"id": op_id, "kind": "disk.create", "target": f"disk:{op_id}", "status": status,
            "progress": 1.0 if ended is not None else 0.0, "bytesTotal": None,
            "started": started}
    if ended is not None:
        view["ended"] = ended
    db = sqlite3.connect(db_path, timeout=10)
    try:
        with db:
            db.execute("INSERT INTO operations VALUES (?,?,?,?,?,?)",
                       (op_id, view["kind"], status, started, ended, json.dumps(view)))
    finally:
        db.close()


def _status(stack, op_id: str) -> int:
    status, _ = stack.api("GET", f"/operations/{op_id}")
    return status


def _finish_one(stack, name: str) -> str:
    op = stack.nbdserver("disk", "create", name, "--size", "1M", "--no-wait")
    stack.nbdserver("operation", "wait", op["id"], "--quiet")
    return op["id"]


def test_finished_operations_past_retention_go_and_running_or_recent_ones_stay(make_stack):
    stack = make_stack()
    db_path = stack.nb_dir / "platform.db"
    now = time.time()
    old = now - RETENTION - DAY
    stack.stop_nbdserver()
    # As a server that ran for weeks leaves the table: finished long ago, finished
    # lately, and one that was running when it stopped (it started long ago).
    _plant(db_path, "00000000000000a1", "succeeded", old - 60, old)
    _plant(db_path, "00000000000000a2", "failed", old - 60, old)
    _plant(db_path, "00000000000000a3", "succeeded", now - DAY, now - DAY + 5)
    _plant(db_path, "00000000000000a4", "running", old - 60, None)
    stack.start_nbdserver(same_ports=True)

    # At start: the old finished ones are forgotten, the recent one is kept, and the
    # one cut by the stop is reported interrupted (it ended now), not pruned.
    assert _status(stack, "00000000000000a1") == 404
    assert _status(stack, "00000000000000a2") == 404
    assert stack.nbdserver("operation", "show", "00000000000000a3")["status"] == "succeeded"
    assert stack.nbdserver("operation", "show", "00000000000000a4")["status"] == "interrupted"

    # While it runs: rows that aged past the window go when the next operation ends;
    # a running one stays however old it is.
    _plant(db_path, "00000000000000b1", "succeeded", old - 60, old)
    _plant(db_path, "00000000000000b2", "running", old - 60, None)
    assert _status(stack, "00000000000000b1") == 200  # nothing prunes between ends
    done = _finish_one(stack, "oplog1")
    assert _status(stack, "00000000000000b1") == 404
    assert stack.nbdserver("operation", "show", "00000000000000b2")["status"] == "running"
    assert stack.nbdserver("operation", "show", done)["status"] == "succeeded"
    assert stack.nbdserver("operation", "show", "00000000000000a3")["status"] == "succeeded"


def test_at_most_keep_finished_operations_are_kept_the_last_ended_first(make_stack):
    stack = make_stack()
    db_path = stack.nb_dir / "platform.db"
    now = time.time()
    # KEEP + 10 recent finished rows (inside the window): only the cap bounds them.
    db = sqlite3.connect(db_path, timeout=10)
    try:
        with db:
            rows = []
            for i in range(KEEP + 10):
                op_id = f"f{i:015x}"
                ended = now - 3600 + i  # a higher i ended later
                view = {"id": op_id, "kind": "disk.create", "target": "disk:x",
                        "status": "succeeded", "started": ended - 1, "ended": ended}
                rows.append((op_id, "disk.create", "succeeded", ended - 1, ended, json.dumps(view)))
            db.executemany("INSERT INTO operations VALUES (?,?,?,?,?,?)", rows)
    finally:
        db.close()
    _plant(db_path, "00000000000000c1", "running", now - 7200, None)
    # Started before all of them, ended after: a long copy. The cap counts by end.
    _plant(db_path, "00000000000000c2", "succeeded", now - 2 * DAY, now - 60)

    done = _finish_one(stack, "oplog2")

    db = sqlite3.connect(db_path, timeout=10)
    try:
        finished = db.execute("SELECT count(*) FROM operations WHERE status != 'running'").fetchone()[0]
    finally:
        db.close()
    assert finished == KEEP
    assert stack.nbdserver("operation", "show", done)["status"] == "succeeded"
    assert stack.nbdserver("operation", "show", "00000000000000c1")["status"] == "running"
    # The ones that ended first went: the 12 oldest of the planted rows.
    assert _status(stack, f"f{11:015x}") == 404
    assert _status(stack, f"f{12:015x}") == 200
    assert _status(stack, f"f{KEEP + 9:015x}") == 200
    assert stack.nbdserver("operation", "show", "00000000000000c2")["status"] == "succeeded"
