"""Revocation latency, measured (not asserted): from the key service's answer to the
owner's `disable` to the first failed I/O of a client writing in a loop, over N trials.

    .venv/bin/python -m pytest tests/platform/test_platform_latency.py --slow -s
    REVOCATION_TRIALS=50 .venv/bin/python -m pytest ... --slow -s

Speed is a benchmark's business, never a test's: this prints p50/p99/max and checks only
that every trial did end in a failed I/O.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.platform import revocation_latency


@pytest.mark.slow
def test_revocation_latency(make_stack):
    trials = int(os.environ.get("REVOCATION_TRIALS", "20"))
    stack = make_stack()
    stack.customer_key("lat", "k1", "des-lat")
    stack.create_disk("lat1", "--size", "16M", "--des", "des-lat")
    r = revocation_latency(stack, "lat1", "lat", "k1", trials)
    assert len(r["samples"]) == trials
    ms = [round(s * 1000, 1) for s in r["samples"]]
    print(f"\nrevocation latency over {trials} trials: p50 {r['p50'] * 1000:.1f} ms, "
          f"p99 {r['p99'] * 1000:.1f} ms, max {r['max'] * 1000:.1f} ms; samples in order (ms): {ms}")
