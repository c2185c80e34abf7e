"""Load: hundreds of concurrent connections across many encrypted exports, mixed I/O
with verification; every request completes, none fails, memory stays bounded.

Two client processes (tests/reliability/loadclient.py, one select loop each over its
libnbd handles) open `CONNECTIONS` connections in total over `EXPORTS` XTS exports of
the baseline server and run for `SECONDS`. The figures (IOPS, MiB/s, server RSS before,
peak, after) are printed for docs/reliability.md; only correctness is asserted
(no errors, no mismatches, nothing lost, RSS growth bounded), never speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers.servers import ROOT, wait_until
from tests.reliability.conftest import rss_kib

# RSS bound: 64 in flight x 64 KiB per connection is 4 MiB at most per connection in
# buffers, but clients keep only 4 in flight: 256 x 4 x 64 KiB = 64 MiB, plus
# per-connection state and the interpreter's arenas. 384 MiB of growth would mean a leak.
RSS_GROWTH_LIMIT_KIB = 384 * 1024


def run_load(server_factory, tmp_path, *, connections: int, exports: int, seconds: float, seed: int) -> dict:
    key = tmp_path / "dek.key"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    srv = server_factory([f"e{i}={tmp_path / f'e{i}.img'},size=64M,key={key}" for i in range(exports)],
                   extra_args=["--log-level", "WARNING"])
    before = rss_kib(srv.pid)
    procs = []
    per_proc = connections // 2
    for n in range(2):
        targets = []
        for i in range(per_proc):
            targets.append(f"{srv.uri(f'e{(n * per_proc + i) % exports}')}#1")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.loadclient", "--seconds", str(seconds),
             "--seed", str(seed + n), "--region-base", str(n * 32), *targets],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env))
    peak = before
    deadline = time.monotonic() + seconds + 180

    def finished():
        nonlocal peak
        peak = max(peak, rss_kib(srv.pid))
        return all(p.poll() is not None for p in procs)
    wait_until(finished, deadline - time.monotonic(), interval=0.2, what="load clients")
    results = []
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, f"load client failed:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    after = rss_kib(srv.pid)
    total = {k: sum(r[k] for r in results) for k in
             ("connections", "issued", "completed", "errors", "mismatches", "lost", "bytes")}
    secs = max(r["seconds"] for r in results)
    total.update(exports=exports, seconds=secs, iops=round(total["completed"] / secs),
                 mib_s=round(total["bytes"] / secs / (1 << 20), 1),
                 rss_before_mib=round(before / 1024, 1), rss_peak_mib=round(peak / 1024, 1),
                 rss_after_mib=round(after / 1024, 1),
                 error_samples=[e for r in results for e in r["error_samples"]][:5],
                 mismatch_samples=[e for r in results for e in r["mismatch_samples"]][:5])
    srv.assert_healthy()
    return total


def check(total: dict, connections: int) -> None:
    print(f"\nload: {json.dumps(total)}")
    assert total["connections"] == connections
    assert total["errors"] == 0, total["error_samples"]
    assert total["mismatches"] == 0, total["mismatch_samples"]
    assert total["lost"] == 0
    assert total["completed"] == total["issued"]
    assert (total["rss_peak_mib"] - total["rss_before_mib"]) * 1024 < RSS_GROWTH_LIMIT_KIB


def test_load_256_connections_32_exports(server_factory, tmp_path):
    total = run_load(server_factory, tmp_path, connections=256, exports=32, seconds=30, seed=1)
    check(total, 256)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_load_long(server_factory, tmp_path):
    conns = int(os.environ.get("RELIABILITY_LOAD_CONNECTIONS", "512"))
    total = run_load(server_factory, tmp_path, connections=conns, exports=64,
                     seconds=float(os.environ.get("RELIABILITY_LOAD_SECONDS", "300")), seed=2)
    check(total, conns)
