"""bench.harness (medians and ratios) and the target/workload registries; no server is run."""

import pytest

from bench import targets, workloads
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
