"""The two-host scenario of issue 15, on real daemons in network namespaces
(tests/helpers/cluster.py): hosts a and b each run `keyservice serve` and `nbdserver
serve`, all four on one PostgreSQL (`--state postgresql://...`), disks on one Ceph
cluster (`--storage rbd:POOL`) on a third host; a fourth host is the client.

fio writes a disk through a, with crc32c verification, while another client keeps
writing to it; a is killed -9; the disk is served by b (the failover time, from the kill
to the first successful read through b, is printed); every write a answered to the
client it was killed under reads back through b, and fio's verification of what it wrote
through a passes through b; then the key disabled on a's key service stops I/O on b.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.helpers import cluster
from tests.helpers.cluster import ClusterLab
from tests.host.test_host_network import Client

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

DISK_LEASE = 3.0  # --disk-lease-seconds: a dead server's disks are free after this
# The lease, then librbd's wait for the dead holder's watch to lapse (the throwaway
# cluster's `osd client watch timeout`, 10 s), then the client's retries: a bound on a
# loaded machine, not a figure.
FAILOVER_DEADLINE = 60.0
REVOCATION_DEADLINE = 5.0  # as tests/helpers/platform.wait_for_eio; the figure is printed
CLI_STARTUP = 30.0  # the disable's CLI: a Python start-up on a loaded machine
FIO_REGION = ["--offset=1M", "--size=8M", "--bs=64k", "--rw=write", "--verify=crc32c",
              "--verify_fatal=1"]  # past the first MiB, where the other client writes


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    why = cluster.missing()
    if why:
        pytest.skip(why)
    began = time.monotonic()
    with ClusterLab(tmp_path_factory.mktemp("cluster"), disk_lease=DISK_LEASE) as lab:
        lab.start_host("a")
        lab.start_host("b")
        print(f"cluster fixture: {time.monotonic() - began:.1f} s to start "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in lab.costs.items())})")
        yield lab
        for host in lab.hosts.values():
            assert "Traceback" not in host.logs(), host.logs()[-6000:]


def test_failover_to_the_other_host_then_revocation_there(lab):
    a, b = lab.hosts["a"], lab.hosts["b"]
    disk = a.customer_disk("d1", "16M", subscription="sub1")
    assert disk["file"].startswith(f"rbd:{lab.ceph.pool}/"), disk
    # One platform: what a made, b's CLI shows (b also exports it at its next lease sync).
    assert b.nbdserver("disk", "show", "d1")["file"] == disk["file"]

    held = Client(lab.net, a.uri("d1"), lab.tls_dir)  # writes on through the kill
    try:
        held.ok_count()
        written = lab.fio("a", "d1", *FIO_REGION, "--do_verify=1")
        assert written.returncode == 0, written.stdout + written.stderr
        held.ok_count()  # a still serves the held client after fio's run

        killed = a.kill_nbdserver()  # -9, clients attached and writing
        assert held.expect("ERR")
        served = lab.first_read("b", "d1", FAILOVER_DEADLINE)
        # Every write a answered to the client it was killed under, read through b.
        held.stdin.write(f"VERIFY_AT {b.uri('d1')}\n")
        held.stdin.flush()
        answer = held.expect("")
        while not answer.startswith(("VERIFIED", "MISMATCH")):
            answer = held.expect("")
        assert answer.startswith("VERIFIED") and int(answer.split()[1]) > 0, answer
        print(f"answered writes read back through b: {answer}")
    finally:
        held.close()
    print(f"failover: {served - killed:.2f} s from kill -9 of a to the first read through b")

    verified = lab.fio("b", "d1", *FIO_REGION, "--verify_only", "--output-format=json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    job = json.loads(verified.stdout[verified.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 8 << 20, job  # all of it, read back

    c = Client(lab.net, b.uri("d1"), lab.tls_dir)
    try:
        c.ok_count()
        # Disabled on the other host's key service, by its CLI in a thread of its own, so
        # the client's first error is seen when it comes, not after the CLI exits.
        done: list[float] = []
        cli = threading.Thread(target=lambda: (a.keyservice("key", "disable", "cust", "k1"),
                                               done.append(time.monotonic())))
        started = time.monotonic()
        cli.start()
        c.expect("ERR", timeout=REVOCATION_DEADLINE + CLI_STARTUP)
        failed = time.monotonic()
        cli.join(timeout=60)
        assert done, "keyservice key disable did not finish"
        print(f"revocation: I/O through b failed {failed - started:.2f} s after the disable "
              f"command started, {failed - done[0]:+.2f} s from its exit (its answer)")
        assert failed - done[0] <= REVOCATION_DEADLINE
        assert b.nbdserver("disk", "show", "d1")["serving"]["state"] == "locked"
    finally:
        c.close()
