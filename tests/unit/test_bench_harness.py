"""bench.harness (medians and ratios) and the target/workload registries; no server is run."""

from pathlib import Path

import pytest

from bench import harness, process, targets, workloads
from bench.harness import median_of, reduce


def run(target, workload, n, iops, p50=10.0, p99=20.0):
    return {"target": target, "workload": workload, "run": n, "iops": iops,
            "bw_bytes": iops * 4096, "clat_p50_us": p50, "clat_p99_us": p99}


def test_median_is_per_metric_over_successful_runs_only():
    samples = [run("a", "w", 1, 100, p99=50), run("a", "w", 2, 300, p99=10),
               run("a", "w", 3, 200, p99=30), {"target": "a", "workload": "w", "run": 4, "error": "x"}]
    m = median_of(samples)
    assert (m["iops"], m["clat_p99_us"], m["runs_ok"], m["runs"]) == (200, 30, 3, 4)
    assert m["iops_spread"] == 1.0  # (300 - 100) / 200


def test_all_runs_failed_gives_none_not_a_crash():
    m = median_of([{"target": "a", "workload": "w", "run": 1, "error": "boom"}])
    assert m["iops"] is None and m["iops_spread"] is None and m["runs_ok"] == 0


def test_ratios_compare_median_iops_to_the_reference():
    runs = [run("plain", "w", i, v) for i, v in enumerate((100, 110, 90))]
    runs += [run("xts", "w", i, v) for i, v in enumerate((50, 60, 40))]
    med = reduce(runs, ["plain", "xts"], ["w"], "plain")
    assert med["plain"]["w"]["ratio"] == 1.0
    assert med["xts"]["w"]["ratio"] == pytest.approx(0.5)


def test_no_reference_means_no_ratio():
    med = reduce([run("xts", "w", 1, 50)], ["xts"], ["w"], "plain")
    assert med["xts"]["w"]["ratio"] is None


def test_selection_keeps_order_and_names_unknowns():
    assert targets.select("xts,plain") == ["xts", "plain"]
    assert targets.select(None) == list(targets.REGISTRY)
    with pytest.raises(ValueError, match="unknown target.*nope"):
        targets.select("plain,nope")
    assert [w.name for w in workloads.select("randread-qd1,seqread")] == ["seqread", "randread-qd1"]
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.select("seqread,zzz")


def test_the_registry_holds_the_five_targets():
    assert {"plain", "xts", "nbdkit", "nbdkit-luks", "qemu-nbd-luks"} <= set(targets.REGISTRY)
    assert all(issubclass(c, targets.Target) for c in targets.REGISTRY.values())


def test_headline_figure_per_workload_shape():
    assert workloads.SUITE["seqread"].headline == "bandwidth"
    assert workloads.SUITE["randwrite"].headline == "iops"
    assert workloads.SUITE["randread-qd1"].headline == "latency"


# -- new states, CPU per I/O, the device baseline


def test_stat_fields_are_counted_from_the_last_parenthesis():
    # comm may hold spaces and ')': fields 14-17 are utime, stime, cutime, cstime.
    fields = ["S", "7"] + ["0"] * 9 + ["100", "20", "3", "4"] + ["0"] * 30
    line = "1234 (python3 -m (x) y) " + " ".join(fields)
    assert process.stat_cpu_ticks(line) == (7, 127)


def test_process_tree_cpu_sums_the_live_descendants_only(tmp_path, monkeypatch):
    def proc(pid, ppid, ticks):
        (tmp_path / str(pid)).mkdir()
        f = ["S", str(ppid)] + ["0"] * 9 + [str(ticks), "0", "0", "0"] + ["0"] * 10
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (srv) " + " ".join(f))
    proc(10, 1, 100)     # the server
    proc(11, 10, 50)     # its worker process
    proc(12, 11, 25)     # and that one's child
    proc(20, 1, 1000)    # a stranger
    (tmp_path / "self").mkdir()
    monkeypatch.setattr(process.os, "sysconf", lambda name: 100)
    assert process.process_tree_cpu(10, tmp_path) == 1.75
    assert process.process_tree_cpu(11, tmp_path) == 0.75
    with pytest.raises(ProcessLookupError):
        process.process_tree_cpu(99, tmp_path)


def test_cpu_per_io_counts_the_ramp_too():
    # 2 s of CPU over 5 s + 1 s ramp at 10,000 IOPS: 60,000 I/Os.
    assert harness.cpu_us_per_io(2.0, 10_000, 6) == pytest.approx(33.333, rel=1e-3)
    assert harness.cpu_us_per_io(1.0, 0, 6) is None


def test_host_busy_share_from_two_proc_stat_samples(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq: idle and iowait are the idle ones
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n")
    before = harness.cpu_times(stat)
    assert before == (1000, 850)
    stat.write_text("cpu  250 0 100 850 50 0 0 0 0 0\ncpu0 1 2 3\n")
    # 250 ticks passed, 50 of them idle
    assert harness.busy_share(before, harness.cpu_times(stat)) == pytest.approx(0.8)
    assert harness.busy_share(before, before) is None


def test_cpu_bound_iops_is_all_cpus_over_server_plus_client():
    # 2 CPUs, 12 us of server and 8 us of client per I/O: 100,000 IOPS at most.
    assert harness.cpu_bound_iops(2, 12.0, 8.0) == pytest.approx(100_000)
    assert harness.cpu_bound_iops(2, 0.0, 20.0) == pytest.approx(100_000)  # no server: fio alone
    assert harness.cpu_bound_iops(2, None, 8.0) is None
    assert harness.cpu_bound_iops(2, 12.0, None) is None


def test_device_ratio_and_not_applicable_pairs():
    runs = [run("plain", "cold", 1, 20_000), run("device", "cold", 1, 80_000),
            run("plain", "warm", 1, 100_000)]
    med = reduce(runs, ["plain", "device"], ["cold", "warm"], "plain")
    assert med["plain"]["cold"]["device_ratio"] == 0.25
    assert med["device"]["warm"]["runs"] == 0 and med["device"]["warm"]["iops"] is None
    assert med["plain"]["warm"]["device_ratio"] is None


def test_optional_figures_missing_from_some_runs_take_the_median_of_the_rest():
    a, b = run("t", "w", 1, 100), run("t", "w", 2, 200)
    a["cpu_us_per_io"], b["cpu_us_per_io"] = 10.0, None
    assert median_of([a, b])["cpu_us_per_io"] == 10.0


def test_new_workloads_and_targets():
    s = workloads.SUITE
    assert (s["randread-cold"].state, s["randread-cold"].iodepth) == ("cold", 16)
    assert s["randwrite-seqfill"].state == "seqfill"
    assert s["randwrite-4conn"].numjobs == 4 and s["randread-4conn"].numjobs == 4
    assert s["randwrite-qd1"].headline == "latency"
    with pytest.raises(ValueError, match="unknown state"):
        workloads.Workload("x", "read", 4096, 1, "x", state="lukewarm")
    assert {"product", "product-cmk", "device"} <= set(targets.REGISTRY)
    dev = targets.REGISTRY["device"](Path("/nonexistent"), 1 << 20)
    assert dev.supports(s["randread-cold"]) is None
    assert dev.supports(s["randread"]) and dev.supports(s["seqread-cold"])
    assert targets.REGISTRY["plain"](Path("/nonexistent"), 1 << 20).supports(s["randread-cold"]) is None


class FakeTarget:
    name = "fake"

    def __init__(self, pid=42):
        self.events = []
        self.pid = pid
        self.uri = "nbd://h:1/d"
        self.image = Path("/nonexistent/disk.img")

    def restart(self):
        self.events.append("restart")


def bench_with(monkeypatch, events):
    b = harness.Bench([], [], harness.Settings())
    monkeypatch.setattr(harness, "cold_unavailable", lambda: None)
    monkeypatch.setattr(harness, "drop_caches", lambda: events.append("drop"))
    monkeypatch.setattr(harness, "warm", lambda path: events.append("warm"))
    monkeypatch.setattr(harness.os, "sync", lambda: events.append("sync"))
    return b


def test_cold_restarts_the_server_before_dropping_the_cache(monkeypatch, tmp_path):
    t = FakeTarget()
    bench_with(monkeypatch, t.events)._prepare_state(t, workloads.SUITE["randread-cold"], tmp_path, 1)
    assert t.events == ["restart", "drop"]
    t = FakeTarget(pid=None)  # the device baseline has no server to restart
    bench_with(monkeypatch, t.events)._prepare_state(t, workloads.SUITE["randread-cold"], tmp_path, 1)
    assert t.events == ["drop"]


def test_seqfill_writes_through_the_server_and_never_reads_back(monkeypatch, tmp_path):
    t = FakeTarget()
    b = bench_with(monkeypatch, t.events)
    ran = []

    class Done:
        returncode, stderr = 0, ""
    monkeypatch.setattr(harness.subprocess, "run", lambda argv, **kw: ran.append(argv) or Done())
    b._prepare_state(t, workloads.SUITE["randwrite-seqfill"], tmp_path, 1 << 20)
    assert t.events == ["sync", "sync"]  # no warm read, no restart
    assert "--uri=nbd://h:1/d" in ran[0] and "--bs=1M" in ran[0] and "--rw=write" in ran[0]


def test_warm_reads_the_image_back(monkeypatch, tmp_path):
    t = FakeTarget()
    bench_with(monkeypatch, t.events)._prepare_state(t, workloads.SUITE["randwrite"], tmp_path, 1)
    assert t.events == ["sync", "warm"]


def test_cold_without_root_is_a_run_error_not_a_crash(monkeypatch, tmp_path):
    t = FakeTarget()
    b = bench_with(monkeypatch, t.events)
    monkeypatch.setattr(harness, "cold_unavailable", lambda: "needs root")
    with pytest.raises(OSError, match="needs root"):
        b._prepare_state(t, workloads.SUITE["randread-cold"], tmp_path, 1)
    assert t.events == []
