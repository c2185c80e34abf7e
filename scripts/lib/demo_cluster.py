"""`./scripts/demo --cluster`: the two-host scenario of issue 15, step by step.

Two platform hosts (a and b) in network namespaces, each running `keyservice serve` and
`nbdserver serve` on one PostgreSQL, disks on a Ceph cluster on a third host, a client on
a fourth (tests/helpers/cluster.py builds it, as for tests/host/test_cluster_failover.py).
fio writes a disk through a with crc32c verification; the NBD server of the host that
serves the disk is killed -9, the other takes it over (the failover time is printed) and
fio verifies there; this repeats in turns (--trials); then the key, disabled on the other
host's key service, stops I/O, and enabled, brings it back with the data intact.
Everything started here is stopped and removed on exit. Exit status 0 when every step
did what it should.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.cluster import ClusterLab, missing
from tests.host.test_host_network import Client

DISK_LEASE = 3.0
FAILOVER_DEADLINE = 60.0
REVOCATION_DEADLINE = 5.0
FIO = ["--offset=1M", "--size=8M", "--bs=64k", "--rw=write", "--verify=crc32c", "--verify_fatal=1"]


class DemoFailed(Exception):
    pass


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def say(text: str) -> None:
    print(text, flush=True)


def fio(lab: ClusterLab, host: str, *args: str) -> dict:
    r = lab.fio(host, "d1", *FIO, *args, "--output-format=json")
    if r.returncode != 0:
        raise DemoFailed(f"fio through {host} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    if job["error"]:
        raise DemoFailed(f"fio through {host}: error {job['error']}")
    return job


def failover(lab: ClusterLab, serving: str, other: str) -> float:
    """Kill -9 the NBD server of `serving` while a client writes; seconds until the
    first read through `other`; fio then verifies through `other`."""
    held = Client(lab.net, lab.hosts[serving].uri("d1"), lab.tls_dir)
    try:
        held.ok_count()
        say(f"a client on host cli writes to d1 through {serving} ({lab.hosts[serving].uri('d1')})")
        step(f"kill -9 the NBD server of host {serving}")
        killed = lab.hosts[serving].kill_nbdserver()
        held.expect("ERR")
        say(f"-> the client's writes through {serving} fail, as they must")
        step(f"wait for the first read of d1 through host {other}")
        served = lab.first_read(other, "d1", FAILOVER_DEADLINE)
    finally:
        held.close()
    seconds = served - killed
    say(f"-> failover: {seconds:.2f} s from the kill to the first successful read through {other}")
    step(f"fio verifies through {other} every block it wrote before the kill")
    job = fio(lab, other, "--verify_only")
    say(f"-> verified {job['read']['io_bytes'] >> 20} MiB, no mismatch")
    step(f"restart the NBD server of host {serving} (it becomes the standby)")
    lab.hosts[serving].start_nbdserver()
    say(lab.hosts[serving].ready_line)
    return seconds


def walk(lab: ClusterLab, trials: int) -> None:
    step("Hosts: network namespaces on one bridge")
    for name in lab.net.hosts:
        say(f"{name:6s} {lab.net.addr(name)}")
    say(f"PostgreSQL: a unix socket every host reaches ({lab.costs['postgresql']:.1f} s to start)")
    lab.ceph_ready()  # started in the background by the lab (tests/helpers/cluster.py)
    say(f"Ceph: a monitor and a memstore OSD on host store, {lab.ceph.addr} "
        f"({lab.costs['ceph']:.1f} s to start)")

    for name in ("a", "b"):
        step(f"Host {name}: keyservice serve and nbdserver serve, state on PostgreSQL, disks on RBD")
        if name == "b":
            say("(b gets a's master keys and the key service's admin credential first)")
        host = lab.start_host(name)
        say(f"key service at {host.ks_url} on {name}'s loopback; {host.ready_line}")

    a = lab.hosts["a"]
    step("On host a: a vault, an RSA key, an encryption set, its grant, a 16 MiB disk on RBD")
    disk = a.customer_disk("d1", "16M", subscription="demo")
    say(f"disk d1: {disk['file']}")
    step("Host b knows it: one platform")
    say(f"disk d1 on b: {lab.hosts['b'].nbdserver('disk', 'show', 'd1')['file']}")

    step("fio on host cli writes 8 MiB through a, with crc32c verification")
    job = fio(lab, "a", "--do_verify=1")
    say(f"-> wrote {job['write']['io_bytes'] >> 20} MiB and read it back verified")

    times, serving, other = [], "a", "b"
    for _ in range(trials):
        times.append(failover(lab, serving, other))
        serving, other = other, serving

    step(f"Disable the key on host {other}'s key service: I/O through {serving} stops")
    c = Client(lab.net, lab.hosts[serving].uri("d1"), lab.tls_dir)
    try:
        c.ok_count()
        started = time.monotonic()
        lab.hosts[other].keyservice("key", "disable", "cust", "k1")
        c.expect("ERR", timeout=REVOCATION_DEADLINE)
        say(f"-> the client's I/O failed within {time.monotonic() - started:.2f} s of the "
            "command's start (its start-up included)")
        state = lab.hosts[serving].nbdserver("disk", "show", "d1")["serving"]
        say(f"-> d1 on {serving}: {state['state']} ({state.get('reason')})")
        step("Enable the key: the same connection serves again")
        lab.hosts[other].keyservice("key", "enable", "cust", "k1")
        c.expect("RECOVERED", timeout=FAILOVER_DEADLINE)
        say("-> recovered")
    finally:
        c.close()
    job = fio(lab, serving, "--verify_only")
    say(f"-> fio verified {job['read']['io_bytes'] >> 20} MiB through {serving}")

    step("Done: every step did what it should")
    say("failover (kill -9 to the first read on the other host): "
        + ", ".join(f"{t:.2f} s" for t in times)
        + (f"; median {statistics.median(times):.2f} s" if len(times) > 1 else ""))


def main() -> int:
    ap = argparse.ArgumentParser(prog="./scripts/demo --cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=2, help="failovers, in turns a->b, b->a, ...")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    why = missing()
    if why:
        print(f"DEMO FAILED: {why}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="nbd-demo-cluster."))
    began = time.monotonic()
    lab = ClusterLab(workdir, disk_lease=DISK_LEASE)
    lab.echo = say
    try:
        with lab:
            walk(lab, max(1, args.trials))
    except (DemoFailed, AssertionError, TimeoutError, RuntimeError) as e:
        print(f"\nDEMO FAILED: {e}", file=sys.stderr)
        for name, host in lab.hosts.items():
            print(f"--- host {name}, daemons' stderr (tail)", file=sys.stderr)
            print("\n".join(host.logs().splitlines()[-20:]), file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=sys.stderr)
    say(f"({time.monotonic() - began:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
