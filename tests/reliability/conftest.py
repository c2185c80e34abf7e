"""Fixtures of the reliability suite: real daemons, real clients, real faults.

Every test here starts the servers as processes and talks to them as a client would;
faults are real too where the machine allows it (a full filesystem, EIO from a FUSE
file, kill -9). What each test cannot do for real is said in its module docstring and in
docs/reliability.md.
"""

from __future__ import annotations

import os
import random

import pytest


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@pytest.fixture
def seeded_rng(request):
    """A RNG whose seed is printed, so that a failing random run can be replayed
    (RELIABILITY_SEED=N)."""
    seed = int(os.environ.get("RELIABILITY_SEED", random.randrange(1 << 32)))
    print(f"RELIABILITY_SEED={seed} for {request.node.nodeid}")
    return random.Random(seed)
