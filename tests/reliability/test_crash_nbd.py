"""Crash consistency of the NBD data path: kill -9 the server mid-workload, restart,
check every write it promised durable.

The server serves an AES-XTS encrypted file (the baseline runner with `key=`: the same
Export -> XtsLayer -> FileBackend path the platform uses). A `DurabilityClient` keeps 32
requests in flight (writes, FUA writes, flushes) and kills the server with SIGKILL when a
random number of replies (seeded RNG) has arrived. After a restart on the same file and
key, every record the server promised durable must read back exactly, and so must every
record of the earlier cycles.

What this proves and what it does not: SIGKILL ends the process but not the kernel, so
the page cache survives. This checks the server's own ordering (no reply before the data
reached the kernel, no state held only in the process), not power loss; for that the
FUA/FLUSH paths map to RWF_DSYNC/fdatasync (tests/unit/test_backend.py).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.helpers.servers import BaselineServer
from tests.reliability.crashlog import BLOCK, DurabilityClient, verify

DISK = 256 << 20
REGION = 2048               # slots per cycle: more than the largest kill point + in flight
KILL_MIN, KILL_MAX = 20, 1500
CI_CYCLES = 10
SOAK_CYCLES = int(os.environ.get("RELIABILITY_CRASH_CYCLES", "200"))


def crash_cycles(workdir, rng, cycles: int, cache: str = "writeback") -> dict:
    key = workdir / "dek.key"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    stats: dict[str, Any] = {"cycles": 0, "failures": 0, "acked": 0, "durable": 0, "lost_acked": 0, "problems": []}
    regions = DISK // BLOCK // REGION
    expected: dict[int, tuple[int, int]] = {}
    image = None
    for cycle in range(cycles):
        if cycle % regions == 0:  # a fresh disk when the regions are used up
            image = workdir / f"disk{cycle // regions}.img"
            expected.clear()
        spec = [f"d={image},size={DISK},key={key},cache={cache}"]
        srv = BaselineServer(workdir, spec, name=f"crash{cycle}").start()
        client = DurabilityClient(srv.uri("d"), cycle, (cycle % regions) * REGION, rng)
        client.run(kill_pid=srv.pid, kill_after=rng.randint(KILL_MIN, KILL_MAX))
        client.close()
        srv.kill()
        assert "Traceback" not in srv.stderr_text(), srv.stderr_text()[-3000:]
        for seq in client.durable:
            expected[client.slot(seq)] = (cycle, seq)
        # Restart on the same file and key: every promise of this and earlier cycles holds.
        with BaselineServer(workdir, spec, name=f"check{cycle}") as check:
            import nbd
            h = nbd.NBD()
            h.connect_uri(check.uri("d"))
            problems = verify(h, expected)
            # Acknowledged but not yet durable writes survive SIGKILL too (page cache):
            # counted, not asserted, since the protocol does not promise them.
            acked_only = {client.slot(s): (cycle, s) for s in client.acked if s not in client.durable}
            stats["lost_acked"] += len(verify(h, acked_only))
            h.shutdown()
            check.assert_healthy()
        stats["cycles"] += 1
        stats["acked"] += len(client.acked)
        stats["durable"] += len(client.durable)
        if problems:
            stats["failures"] += 1
            stats["problems"] += problems[:5]
    return stats


def report(name: str, stats: dict) -> None:
    print(f"\n{name}: cycles={stats['cycles']} failures={stats['failures']} "
          f"acked_writes={stats['acked']} durable_writes={stats['durable']} "
          f"acked_not_durable_lost={stats['lost_acked']}")


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_kill9_nbd_server_keeps_durable_writes(tmp_path, seeded_rng, cache):
    """With cache=none (O_DIRECT) FLUSH and FUA keep their meaning: the same promises."""
    stats = crash_cycles(tmp_path, seeded_rng, CI_CYCLES, cache)
    report(f"crash-nbd (CI, cache={cache})", stats)
    assert stats["failures"] == 0, stats["problems"]
    assert stats["durable"] > 0


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_kill9_nbd_server_soak(tmp_path, seeded_rng):
    stats = crash_cycles(tmp_path, seeded_rng, SOAK_CYCLES)
    report("crash-nbd (soak)", stats)
    assert stats["failures"] == 0, stats["problems"]
