"""The scale scenario (bench/scale.py, issue 22) end to end: small in the suite, the
issue's 5,000 disks with 1,000 attached behind --slow. What is asserted is that every
step completes (every attached disk refuses I/O after the revocation and serves again
after the re-enable, every client of the reconnect storm is served) within generous
deadlines; the figures are printed, never compared."""

from __future__ import annotations

import json

import pytest

from bench.scale import run


def _check(out: dict, disks: int, attached: int) -> None:
    print(json.dumps(out, indent=2))
    assert out["disks"] == disks and out["attached"] == attached
    assert len(out["revoke_all_attached_s"]["samples"]) == 3
    assert len(out["reopen_all_attached_s"]["samples"]) == 3
    # The platform's own share, from its log: each revocation and reopen timed.
    for figure in (out["revoke_platform_ms"]["locked"], out["revoke_platform_ms"]["wiped"],
                   out["reopen_platform_ms"]["served"]):
        assert len(figure["samples"]) == 3 and 0 < figure["p50"] <= figure["p99"]
    assert out["revoke_platform_ms"]["locked"]["p99"] <= out["revoke_platform_ms"]["wiped"]["p99"]
    assert all(out["reopen_cpu_s"][d]["p50"] > 0 for d in ("keyservice", "nbdserver"))
    for key in ("create_per_s", "restart_ready_s", "restart_first_served_s", "reconnect_storm_s"):
        assert out[key] > 0, key


def test_scale_scenario_small(tmp_path):
    _check(run(40, 10, tmp_path), 40, 10)


@pytest.mark.slow
def test_scale_scenario_issue_size(tmp_path):
    _check(run(5000, 1000, tmp_path), 5000, 1000)
