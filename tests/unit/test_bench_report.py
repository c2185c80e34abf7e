"""bench.report: Markdown, JSON and PNG rendered from a hand-made results document."""

import json

from bench import report

MiB = 1 << 20


def results() -> dict:
    def m(iops, ratio, bw=None):
        return {"iops": iops, "bw_bytes": bw if bw is not None else iops * 4096,
                "clat_p50_us": 31.5, "clat_p99_us": 120.25, "clat_p999_us": 480.5,
                "cpu_us_per_io": 12.25, "client_cpu_us_per_io": 7.75, "host_busy": 0.875,
                "cpu_bound_iops": 100_000.0, "runs_ok": 3, "runs": 3, "ratio": ratio,
                "device_ratio": None, "iops_spread": 0.125}
    return {
        "date": "2026-01-01T00:00:00+00:00", "duration_s": 1.0,
        "host": {"nproc": 2, "cpu_model": "Test CPU", "kernel": "6.1", "python": "3.11", "hostname": "h",
                 "loadavg_at_start": [0.5, 0, 0], "loadavg_at_end": [1.25, 0, 0]},
        "fio_version": "3.33", "tools": {},
        "settings": {"runs": 3, "runtime_s": 5, "ramp_s": 1, "size_bytes": 1 << 30, "reference": "plain"},
        "workloads": [
            {"name": "seqread", "rw": "read", "bs": MiB, "iodepth": 4,
             "description": "sequential read 1 MiB qd4", "headline": "bandwidth"},
            {"name": "randread-qd1", "rw": "randread", "bs": 4096, "iodepth": 1,
             "description": "random read 4 KiB qd1", "headline": "latency"},
        ],
        "targets": {
            "plain": {"status": "ok", "reason": "", "description": "plain", "command": ["srv", "a|b"]},
            "xts": {"status": "ok", "reason": "", "description": "xts", "command": ["srv", "key=k"]},
            "device": {"status": "ok", "reason": "", "description": "fio", "command": ["fio"]},
            "nbdkit-luks": {"status": "skipped", "reason": "not installed: nbdkit",
                            "description": "luks", "command": []},
        },
        "runs": [],
        "medians": {
            "plain": {"seqread": m(1000, 1.0, bw=1000 * MiB), "randread-qd1": m(20000, 1.0)},
            "xts": {"seqread": m(500, 0.5, bw=500 * MiB),
                    "randread-qd1": {"iops": None, "bw_bytes": None, "clat_p50_us": None,
                                     "clat_p99_us": None, "runs_ok": 0, "runs": 3, "ratio": None,
                                     "iops_spread": None}},
            "device": {"seqread": {"iops": None, "bw_bytes": None, "clat_p50_us": None,
                                   "clat_p99_us": None, "runs_ok": 0, "runs": 0, "ratio": None,
                                   "iops_spread": None},
                       "randread-qd1": {**m(40000, 2.0), "device_ratio": 1.0,
                                        "cpu_us_per_io": None}},
        },
    }


def test_markdown_summary_shows_headline_figures_and_ratios():
    md = report.markdown(results())
    assert "| workload | `plain` | `xts` | `device` |" in md
    assert "| sequential read 1 MiB qd4 | 1,000 MiB/s (1.00×) | 500 MiB/s (0.50×) | n/a |" in md
    assert "| random read 4 KiB qd1 | 31.5 / 120.2 / 480.5 µs (1.00×) | failed |" in md
    assert "Test CPU" in md and "1 GiB" in md and "3 run(s)" in md
    assert "Load average (1 min) 0.5 at start, 1.25 at end." in md


def test_markdown_detail_and_targets():
    md = report.markdown(results())
    assert ("| seqread | xts | 500.0 | 500 | 31.5 | 120.2 | 480.5 | 12.2 | 7.8 | 88% | 100,000 (0%) "
            "| 0.50× | – | 12% | 3/3 |") in md
    assert "| randread-qd1 | xts | – | – | – | – | – | – | – | – | – | – | – | – | 0/3 |" in md
    # a target with no server has no CPU figure; a pair not run has no detail row
    assert ("| randread-qd1 | device | 156.2 | 40,000 | 31.5 | 120.2 | 480.5 | – | 7.8 | 88% "
            "| 100,000 (40%) | 2.00× | 1.00× |") in md
    assert "| seqread | device |" not in md
    assert "skipped: not installed: nbdkit" in md
    assert "`srv a\\|b`" in md  # a pipe in a command must not break the table


def test_json_round_trips():
    assert json.loads(report.to_json(results())) == results()


def test_write_all_makes_the_three_files(tmp_path):
    paths = report.write_all(results(), tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["fio_version"] == "3.33"
    assert paths["md"].read_text().startswith("# Benchmark results")
