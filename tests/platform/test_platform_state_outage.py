"""The state's PostgreSQL goes down under running daemons (issue 15): both APIs answer
503 with a message while it is down, never 500; a disk already open keeps serving; once
the database is back both daemons work again without a restart (statedb_postgres.py
reconnects)."""

from __future__ import annotations

import nbd
import pytest

from tests.helpers import postgres
from tests.helpers.platform import connect_refused, pattern
from tests.helpers.servers import wait_until

pytest.importorskip("psycopg")


@pytest.fixture
def own_postgres():
    """A server of this test's own: restarting the session's would cut the other tests'."""
    why = postgres.missing()
    if why:
        pytest.skip(why)
    with postgres.PostgresServer() as srv:
        yield srv


def test_a_database_outage_answers_503_and_both_daemons_recover(make_stack, own_postgres):
    ks_dsn = own_postgres.create_database("ks")
    nb_dsn = own_postgres.create_database("nb")
    # A renewal falls in the outage (every 10 s), the fence does not (20 s after the last
    # renewal): the holder keeps serving through a renewal that failed.
    stack = make_stack(ks_args=["--state", ks_dsn],
                       nbd_args=["--state", nb_dsn, "--disk-lease-seconds", "30"])
    stack.create_disk("open", "--size", "4M")
    stack.create_disk("closed", "--size", "4M")
    h = stack.connect("open")
    before = pattern(0x0D1, 64 << 10)
    h.pwrite(before, 0, nbd.CMD_FLAG_FUA)
    assert stack.ks_api("GET", "/vaults/nbd-platform")[0] == 200  # logged in before the outage

    seen: dict[str, list] = {"nbdserver": [], "keyservice": []}
    during = pattern(0x0D2, 64 << 10)

    def while_down() -> None:
        for _ in range(3):
            status, body = stack.api("GET", "/disks")
            seen["nbdserver"].append(status)
            assert status == 503 and "unreachable" in body["error"]["message"], (status, body)
            status, body = stack.ks_api("GET", "/vaults/nbd-platform")
            seen["keyservice"].append(status)
            assert status == 503, (status, body)
        wait_until(lambda: "disk leases not renewed" in stack.nb.stderr_text(), timeout=15,
                   interval=0.1, what="a renewal of the disk leases fails")
        # The open disk serves on: its data path never touches the state.
        h.pwrite(during, 1 << 20, nbd.CMD_FLAG_FUA)
        assert h.pread(len(before), 0) == before
        # Another client of the open disk attaches (this server holds its lease); one of a
        # closed disk needs the lease from the database: refused, as for a busy disk.
        seen["attach"] = [connect_refused(stack, "open"), connect_refused(stack, "closed")]

    own_postgres.restart(while_down)

    wait_until(lambda: stack.api("GET", "/disks")[0] == 200, timeout=15,
               what="the nbdserver API answers again")
    wait_until(lambda: stack.ks_api("GET", "/vaults/nbd-platform")[0] == 200, timeout=15,
               what="the key service API answers again")
    # Writes too, through both daemons (the disk's key is made in the key service).
    stack.create_disk("after", "--size", "4M")
    h2 = stack.connect("after")
    h2.pwrite(before, 0, nbd.CMD_FLAG_FUA)
    assert h2.pread(len(before), 0) == before
    assert h.pread(len(during), 1 << 20) == during
    h.shutdown()
    h2.shutdown()
    assert 500 not in seen["nbdserver"] + seen["keyservice"], seen
    assert seen["attach"][0] is None and seen["attach"][1] is not None, seen
    logs = stack.logs()
    assert "Traceback" not in logs, logs[-4000:]
