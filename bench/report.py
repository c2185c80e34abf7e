"""Renders a results document (see `harness.Bench._results`) as JSON, Markdown and a PNG.

Pure functions of the results dict, except `write_*`, which only put the text on disk,
so the rendering can be tested on a hand-made results dict.
"""

from __future__ import annotations

import json
from pathlib import Path

MiB = 1 << 20


def to_json(results: dict) -> str:
    return json.dumps(results, indent=2, sort_keys=False) + "\n"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def _size(nbytes: int) -> str:
    for unit, n in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if nbytes >= n and nbytes % n == 0:
            return f"{nbytes // n} {unit}"
    return f"{nbytes} B"


def ok_targets(results: dict) -> list[str]:
    return [n for n, t in results["targets"].items() if t["status"] == "ok"]


def headline_cell(workload: dict, m: dict) -> str:
    """The summary table's cell: the workload's headline figure and the ratio to the reference."""
    if not m.get("runs"):
        return "n/a"
    if m.get("iops") is None:
        return "failed"
    kind = workload["headline"]
    if kind == "bandwidth":
        text = f"{_num(m['bw_bytes'] / MiB)} MiB/s"
    elif kind == "latency":
        text = (f"{_num(m['clat_p50_us'], 1)} / {_num(m['clat_p99_us'], 1)} / "
                f"{_num(m.get('clat_p999_us'), 1)} µs")
    else:
        text = f"{_num(m['iops'])} IOPS"
    return f"{text} ({_ratio(m.get('ratio'))})"


def markdown(results: dict) -> str:
    s = results["settings"]
    h = results["host"]
    ref = s["reference"]
    names = ok_targets(results)
    med = results["medians"]
    lines = [
        "# Benchmark results",
        "",
        f"{results['date']} · {h['cpu_model'] or 'unknown CPU'} · {h['nproc']} CPUs · "
        f"kernel {h['kernel']} · fio {results['fio_version']} (ioengine=nbd, one connection "
        "per fio job) · "
        f"{_size(s['size_bytes'])} pre-filled image · {s['runs']} run(s) × {s['runtime_s']:g} s "
        f"(+{s['ramp_s']:g} s ramp), targets interleaved · medians."
        + (f" XTS engine: {h['xts_engine']}." if h.get("xts_engine") else "")
        + (f" Load average (1 min) {h['loadavg_at_start'][0]:g} at start, "
           f"{h['loadavg_at_end'][0]:g} at end." if "loadavg_at_end" in h else ""),
        "",
        f"Ratios are median IOPS relative to `{ref}` (higher is better). "
        "At qd1 the cell shows median / p99 / p99.9 completion latency. "
        "IOPS spread is (max − min) / median over the runs: differences smaller than it are noise. "
        "CPU µs/IO is the server's CPU time (all its threads and processes) per I/O, which does "
        "not depend on how fast the host is; client CPU µs/IO is fio's. Host busy is the share "
        "of all CPUs busy during the run; CPU-bound IOPS is all CPUs divided by server plus "
        "client CPU per I/O, about the most a run could reach here at those costs (in brackets, the "
        "share this run reached). "
        "Workload states: warm (image wholly in the page cache), cold (server restarted and "
        "page cache dropped before each run), seqfill (image written once with 1 MiB "
        "sequential writes through the server, not read back); `vs device` compares cold "
        "reads with fio's own O_DIRECT reads on the same file system "
        f"({results['settings'].get('device_jobs', 16)} threads). n/a: not run for that target.",
        "",
        "## Summary",
        "",
        "| workload | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for w in results["workloads"]:
        cells = [headline_cell(w, med[n][w["name"]]) for n in names]
        lines.append(f"| {w['description']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Detail",
        "",
        f"| workload | target | MiB/s | IOPS | p50 µs | p99 µs | p99.9 µs | CPU µs/IO | "
        f"client CPU µs/IO | host busy | CPU-bound IOPS (reached) | "
        f"vs `{ref}` | vs device | IOPS spread | runs ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in results["workloads"]:
        for n in names:
            m = med[n][w["name"]]
            if not m["runs"]:
                continue  # not applicable to this target
            bw = None if m["bw_bytes"] is None else m["bw_bytes"] / MiB
            lines.append(
                f"| {w['name']} | {n} | {_num(bw, 1)} | {_num(m['iops'])} | "
                f"{_num(m['clat_p50_us'], 1)} | {_num(m['clat_p99_us'], 1)} | "
                f"{_num(m.get('clat_p999_us'), 1)} | {_num(m.get('cpu_us_per_io'), 1)} | "
                f"{_num(m.get('client_cpu_us_per_io'), 1)} | {_percent(m.get('host_busy'))} | "
                f"{_bound(m)} | "
                f"{_ratio(m.get('ratio'))} | {_ratio(m.get('device_ratio'))} | "
                f"{_percent(m.get('iops_spread'))} | {m['runs_ok']}/{m['runs']} |")
    lines += ["", "## Targets", "", "| target | status | what | command |", "|---|---|---|---|"]
    for n, t in results["targets"].items():
        status = t["status"] if t["status"] == "ok" else f"{t['status']}: {t['reason']}"
        cmd = " ".join(t["command"]) if t["command"] else ""
        lines.append(f"| {n} | {_escape(status)} | {t['description']} | `{_escape(cmd)}` |")
    return "\n".join(lines) + "\n"


def _bound(m: dict) -> str:
    """The IOPS server and client together would reach with every CPU busy, and the share
    of it this target reached."""
    bound = m.get("cpu_bound_iops")
    if bound is None:
        return "–"
    reached = f" ({_percent(m['iops'] / bound)})" if m.get("iops") is not None else ""
    return _num(bound) + reached


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def chart(results: dict, path: Path) -> None:
    """One panel per workload, one bar per target, each labelled with its ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ok_targets(results)
    med = results["medians"]
    workloads = results["workloads"]
    cols = min(3, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, w in zip(axes.flat, workloads, strict=False):
        ms = [med[n][w["name"]] for n in names]
        kind = w["headline"]
        x = list(range(len(names)))
        color = [colors[i % len(colors)] for i in x]
        if kind == "latency":
            # p50 and p99 side by side on a log axis: a p99 can be 100x the median.
            p50 = [_or0(m["clat_p50_us"]) for m in ms]
            p99 = [_or0(m["clat_p99_us"]) for m in ms]
            ax.bar([i - 0.2 for i in x], p50, width=0.4, color=color)
            ax.bar([i + 0.2 for i in x], p99, width=0.4, color=color, alpha=0.45, hatch="//")
            ax.set_yscale("log")
            unit = "µs: p50 (solid), p99 (hatched)"
            tops = [(i, max(a, b)) for i, a, b in zip(x, p50, p99, strict=True)]
        else:
            if kind == "bandwidth":
                values, unit = [_or0(m["bw_bytes"]) / MiB for m in ms], "MiB/s"
            else:
                values, unit = [_or0(m["iops"]) for m in ms], "IOPS"
            ax.bar(x, values, color=color)
            tops = list(zip(x, values, strict=True))
        for (i, top), m in zip(tops, ms, strict=True):
            ax.annotate(_ratio(m.get("ratio")), (i, top), ha="center", va="bottom", fontsize=8)
        ax.set_title(w["description"], fontsize=10)
        ax.set_ylabel(unit)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.margins(y=0.15)
    s = results["settings"]
    h = results["host"]
    spare = list(axes.flat)[len(workloads):]
    for ax in spare:
        ax.axis("off")
    if spare:
        spare[0].text(0, 0.5, f"{h['cpu_model']}, {h['nproc']} CPUs, kernel {h['kernel']}\n"
                      f"fio {results['fio_version']}, ioengine=nbd\n"
                      f"{_size(s['size_bytes'])} pre-filled image, {s['runs']} run(s) x "
                      f"{s['runtime_s']:g} s, interleaved", fontsize=9, va="center")
    fig.suptitle(f"fio over NBD, medians of {s['runs']} run(s); labels: IOPS ratio vs "
                 f"{s['reference']} ({results['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _or0(value: float | None) -> float:
    return 0.0 if value is None else value


def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "results.png"}
    paths["json"].write_text(to_json(results))
    paths["md"].write_text(markdown(results))
    chart(results, paths["png"])
    return paths
