"""Crash consistency of the platform's state: kill -9 `nbdserver serve` while it creates
disks and snapshots, and kill -9 the key service while it creates and rotates keys.

After each restart the platform must hold no half-made volume (a row left CREATING is
removed with its file at start; no file without its row), every disk must serve again
with its wrapped DEK still unwrapping, every write the disk promised durable must read
back, and every snapshot that claims to be READY must hold the data it was taken from.
On the key service side every key creation or rotation that was answered must still be
there, with the audit chain valid.

The kill points are conditions (an operation's progress past a random fraction, K
answered requests), drawn from a seeded RNG printed with the test.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from tests.helpers.platform import Stack
from tests.helpers.servers import wait_until
from tests.reliability.crashlog import BLOCK, DurabilityClient, verify

DISK = "32M"
DISK_BYTES = 32 << 20
CI_CYCLES = 4
SOAK_CYCLES = int(os.environ.get("RELIABILITY_PLATFORM_CYCLES", "40"))


def volumes(stack: Stack, kind: str) -> list[dict]:
    status, body = stack.api("GET", f"/{kind}s")
    assert status == 200, body
    return body["value"]


def assert_consistent(stack: Stack) -> dict:
    """No CREATING volume, no orphan file, every disk serving and its DEK unwrapping."""
    files = set()
    for sub in ("disks", "snapshots", "images"):
        d = stack.nb_dir / sub
        if d.is_dir():
            files |= {str(p) for p in d.iterdir()}
    listed = {}
    for kind in ("disk", "snapshot", "image"):
        for v in volumes(stack, kind):
            assert v.get("state", "ready") == "ready", f"{kind} {v['name']} left {v.get('state')}"
            listed[(kind, v["name"])] = v
    for kind, name in listed:
        if kind == "disk":
            stack.wait_serving(name)
            assert len(stack.dek(name)) == 64
    # The API does not show paths: one file per volume, no more (no orphan of a crashed
    # creation) and no less (no volume without its data).
    assert len(files) == len(listed), f"{len(files)} files for {len(listed)} volumes: {sorted(files)}"
    return listed


def platform_crash_cycles(stack: Stack, rng, cycles: int) -> dict:
    stats: dict[str, Any] = {"cycles": 0, "killed_during": {}, "snapshots_checked": 0}
    stack.create_disk("d0", "--size", DISK)
    expected: dict[int, tuple[int, int]] = {}
    snap_expect: dict[str, dict] = {}
    slots = DISK_BYTES // BLOCK
    for cycle in range(cycles):
        # Records on d0, then an operation killed at a random point of its progress.
        c = DurabilityClient(stack.nbd_uri("d0"), cycle, (cycle * 400) % (slots - 400), rng, depth=8)
        c.run(total=rng.randint(20, 300))
        c.close()
        # Regions wrap around: a newer write replaces what a slot must hold, and one that
        # was acknowledged but never made durable leaves the slot with no promise at all.
        for seq in c.acked:
            if seq in c.durable:
                expected[c.slot(seq)] = (cycle, seq)
            else:
                expected.pop(c.slot(seq), None)
        kind = rng.choice(["snapshot", "disk-from-snapshot", "disk"])
        snaps = [v["name"] for v in volumes(stack, "snapshot")]
        if kind == "disk-from-snapshot" and not snaps:
            kind = "snapshot"
        if kind == "snapshot":
            name = f"s{cycle}"
            status, op = stack.api("POST", "/snapshots", {"name": name, "disk": "d0"})
            snap_expect[name] = dict(expected)
        elif kind == "disk-from-snapshot":
            status, op = stack.api("POST", "/disks", {"name": f"c{cycle}",
                                                     "source": f"snapshot:{rng.choice(snaps)}"})
        else:
            status, op = stack.api("POST", "/disks", {"name": f"e{cycle}", "size": DISK})
        assert status == 202, op
        at = rng.random() * 0.9

        def reached():
            s, body = stack.api("GET", f"/operations/{op['id']}")
            return body["status"] != "running" or body["progress"] >= at
        wait_until(reached, 60, what=f"{kind} progress {at:.2f}")
        stack.stop_nbdserver(kill=True)
        stats["killed_during"][kind] = stats["killed_during"].get(kind, 0) + 1
        stack.start_nbdserver(same_ports=True)
        listed = assert_consistent(stack)
        h = stack.connect("d0")
        problems = verify(h, expected)
        h.shutdown()
        assert not problems, problems[:5]
        for snap in list(snap_expect):
            if ("snapshot", snap) not in listed:  # killed before it was READY: gone, fine
                del snap_expect[snap]
        stats["cycles"] += 1
    # Every snapshot that survived as READY holds what d0 had promised when it was taken.
    for snap, exp in snap_expect.items():
        stack.create_disk(f"v-{snap}", "--source", f"snapshot:{snap}")
        stack.wait_serving(f"v-{snap}")
        h = stack.connect(f"v-{snap}")
        problems = verify(h, exp)
        h.shutdown()
        assert not problems, f"snapshot {snap}: {problems[:5]}"
        stats["snapshots_checked"] += 1
    stack.assert_healthy()
    return stats


def test_kill9_nbdserver_during_disk_and_snapshot_creation(tmp_path, seeded_rng):
    with Stack(tmp_path / "stack") as stack:
        stats = platform_crash_cycles(stack, seeded_rng, CI_CYCLES)
    print(f"\ncrash-platform (CI): {stats}")


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_kill9_nbdserver_platform_soak(tmp_path, seeded_rng):
    with Stack(tmp_path / "stack") as stack:
        stats = platform_crash_cycles(stack, seeded_rng, SOAK_CYCLES)
    print(f"\ncrash-platform (soak): {stats}")


def keyservice_crash_cycles(stack: Stack, rng, cycles: int) -> dict:
    """Keys created and rotated from a thread; the key service killed after K answers."""
    stats: dict[str, Any] = {"cycles": 0, "answered": 0}
    stack.keyservice("vault", "create", "kvault", "--location", "local", "--subscription", "sub1",
                     "--enable-purge-protection")
    answered: dict[str, set] = {}   # key name -> versions the key service answered with
    stack.create_disk("pmk0", "--size", "8M")
    w = DurabilityClient(stack.nbd_uri("pmk0"), 0, 0, rng, depth=4)
    w.run(total=50)
    for cycle in range(cycles):
        k = rng.randint(2, 12)
        done = threading.Event()
        count = [0]

        def churn():
            i = 0
            while not done.is_set():
                name = f"k{cycle}-{i % 3}"
                try:
                    if name in answered and rng.random() < 0.5:
                        status, body = stack.ks_api("POST", f"/vaults/kvault/keys/{name}/rotate")
                    else:
                        status, body = stack.ks_api("POST", f"/vaults/kvault/keys/{name}/create",
                                                    {"kty": "RSA", "key_size": 2048})
                except OSError:
                    return  # the key service is gone
                if status == 200:
                    answered.setdefault(name, set()).add(body["key"]["kid"].rsplit("/", 1)[1])
                    count[0] += 1
                i += 1
        t = threading.Thread(target=churn, daemon=True)
        t.start()
        wait_until(lambda: count[0] >= k or not t.is_alive(), 60, what=f"{k} key operations")
        stack.stop_keyservice(kill=True)
        done.set()
        t.join(30)
        # The disk keeps serving on the DEK it holds while the key service is down.
        w.run(total=w.replies + 20)
        stack.start_keyservice()
        for name, versions in answered.items():
            status, body = stack.ks_api("GET", f"/vaults/kvault/keys/{name}/versions")
            assert isinstance(body, dict), body
            assert status == 200, body
            have = {v["kid"].rsplit("/", 1)[1] for v in body["value"]}
            assert versions <= have, f"key {name}: answered versions {versions - have} lost"
        for vault in ("kvault", "nbd-platform"):
            assert stack.keyservice("audit", "verify", vault)["valid"]
        assert len(stack.dek("pmk0")) == 64
        stats["cycles"] += 1
        stats["answered"] += count[0]
    w.close()
    h = stack.connect("pmk0")
    assert not verify(h, {w.slot(s): (0, s) for s in w.durable})
    h.shutdown()
    return stats


def test_kill9_keyservice_during_key_operations(tmp_path, seeded_rng):
    with Stack(tmp_path / "stack") as stack:
        stats = keyservice_crash_cycles(stack, seeded_rng, 3)
        stack.assert_healthy()
    print(f"\ncrash-keyservice (CI): {stats}")


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_kill9_keyservice_soak(tmp_path, seeded_rng):
    with Stack(tmp_path / "stack") as stack:
        stats = keyservice_crash_cycles(stack, seeded_rng, int(os.environ.get("RELIABILITY_KS_CYCLES", "30")))
        stack.assert_healthy()
    print(f"\ncrash-keyservice (soak): {stats}")
