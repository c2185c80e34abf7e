"""Runs the fio suite over the targets and reduces the runs to medians and ratios.

Theory of operation:
1. Every selected target that can run here is started and pre-filled with the same random
   data (nbdcopy through its own NBD URI), so reads hit data, not holes, and every encrypted
   target holds real ciphertext. A target that fails to start is recorded and left out.
2. For run r in 1..N, for each workload, each target runs once, in turn. Interleaving
   targets spreads slow drifts of the machine (page cache, thermal, neighbours) over all
   targets alike instead of charging them to whichever target ran last.
3. Each figure is the median over the runs that succeeded; ratios compare the median IOPS
   with the reference target's (higher is better; for a fixed block size IOPS and
   bandwidth give the same ratio), and for cold workloads also with the `device` target's.
All servers are stopped and their work directories removed on every exit path.

Before each run the image is put in the workload's state (`workloads.STATES`): warm (read
back whole), cold (server restarted, page cache dropped: needs root), or seqfill (written
once through the server with 1 MiB sequential writes, not read back).

Server CPU per I/O: the server's process tree's CPU time (/proc/PID/stat: utime + stime of
all its threads, exited ones included, plus its waited-for children, plus any live child
process) is read right before fio starts and right after it ends. fio counts I/Os after
its ramp only, while the server worked through the ramp too, so the I/Os of the whole
sampled span are taken as the measured IOPS x (ramp + runtime). A server is idle outside
fio's run, so the seconds fio spends starting and connecting add nothing.

Client CPU per I/O and host busy: fio's own CPU time (its rusage, read as the harness's
reaped children's before and after the run: nothing else is reaped meanwhile) is divided
the same way, and /proc/stat says what share of all CPUs was busy while fio ran. On a host
this small the client costs about as much as the server, so together they say how close a
run came to what the CPUs allow at all: `cpu_bound_iops`, all CPUs divided by server plus
client CPU per I/O: an estimate, good to about 10% (softirq and writeback charged to
neither are left out, and the ramp's CPU is spread over the measured rate).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import fio
from .process import ServerStartError, process_tree_cpu
from .targets import REGISTRY, Target
from .workloads import Workload

METRICS = ("iops", "bw_bytes", "clat_p50_us", "clat_p99_us", "clat_p999_us", "cpu_us_per_io",
           "client_cpu_us_per_io", "host_busy", "cpu_bound_iops")
CHUNK = 8 << 20
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
PROC_STAT = Path("/proc/stat")
DEVICE = "device"


@dataclass
class Settings:
    runs: int = 3
    runtime: float = 5
    ramp: float = 1
    size: int = 1 << 30
    reference: str = "plain"
    workdir: Path = Path("bench/work")


@dataclass
class TargetState:
    """What became of one target: `ok` (benchmarked), `skipped` (cannot run here) or `failed`."""
    name: str
    description: str
    status: str = "ok"
    reason: str = ""
    command: list[str] = field(default_factory=list)
    uri: str = ""
    export_size: int = 0
    prefill_seconds: float = 0.0


def host_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "xts_engine": xts_engine(),
            "python": platform.python_version(), "hostname": platform.node(),
            # Other work on the machine is the main source of noise; this says how much there was.
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def xts_engine() -> str:
    """Which OpenSSL does this project's XTS work (scripts/lib/openssl.sh), in a fresh
    interpreter like the servers'."""
    probe = subprocess.run([sys.executable, "-c", "import nbdserver.crypto._xts as x; "
                            "print(x.OPENSSL_VERSION, '(static)' if x.OPENSSL_STATIC else '(system)')"],
                           capture_output=True, text=True, timeout=60)
    return probe.stdout.strip() if probe.returncode == 0 else ""


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def write_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def warm(path: Path, chunk: int = 8 << 20) -> None:
    """Read the whole file, so that all of it is in the page cache."""
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def drop_caches() -> None:
    """Write back, then drop the clean page cache, dentries and inodes (proc(5)): the
    next read of any image comes from the device."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def cold_unavailable() -> str | None:
    return None if os.access(DROP_CACHES, os.W_OK) else f"cannot write {DROP_CACHES} (needs root)"


def cpu_us_per_io(cpu_seconds: float, iops: float, seconds: float) -> float | None:
    """Server CPU microseconds per I/O over a span of `seconds` at `iops` (see the module
    docstring); None when nothing was done."""
    ios = iops * seconds
    return cpu_seconds * 1e6 / ios if ios > 0 else None


def cpu_times(stat: Path = PROC_STAT) -> tuple[int, int]:
    """(all, idle) clock ticks of all CPUs since boot, from /proc/stat's first line (idle
    and iowait count as idle)."""
    fields = [int(x) for x in stat.read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of all CPUs busy between two `cpu_times()` samples."""
    total = after[0] - before[0]
    return 1 - (after[1] - before[1]) / total if total > 0 else None


def children_cpu() -> float:
    """CPU seconds of the harness's children reaped so far (fio's, around one run)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_bound_iops(nproc: int, server_us: float | None, client_us: float | None) -> float | None:
    """The IOPS at which server and client together would keep every CPU busy: what a run
    could reach on this host at those costs, whatever the server's design."""
    if server_us is None or client_us is None or server_us + client_us <= 0:
        return None
    return nproc * 1e6 / (server_us + client_us)


def _uri_of(target: Target) -> str:
    if target.uri is None:
        raise ServerStartError(f"{target.name} serves no NBD URI to fill")
    return target.uri


def median_of(samples: list[dict]) -> dict:
    ok = [s for s in samples if "error" not in s]
    out: dict[str, Any] = {"runs_ok": len(ok), "runs": len(samples)}
    for m in METRICS:
        values = [s[m] for s in ok if s.get(m) is not None]
        out[m] = statistics.median(values) if values else None
    # How far apart the runs were, as a fraction of the median: the noise a ratio must beat.
    out["iops_spread"] = ((max(s["iops"] for s in ok) - min(s["iops"] for s in ok)) / out["iops"]
                          if ok and out["iops"] else None)
    return out


def reduce(runs: list[dict], targets: list[str], workloads: list[str], reference: str) -> dict:
    """Per target and workload: the medians, and the IOPS ratio to the reference target."""
    medians: dict[str, dict[str, dict]] = {}
    for t in targets:
        medians[t] = {}
        for w in workloads:
            medians[t][w] = median_of([r for r in runs if r["target"] == t and r["workload"] == w])
    for t in targets:
        for w in workloads:
            mine = medians[t][w]["iops"]
            for key, other in (("ratio", reference), ("device_ratio", DEVICE)):
                ref = medians.get(other, {}).get(w, {}).get("iops")
                medians[t][w][key] = (mine / ref) if (ref and mine is not None) else None
    return medians


class Bench:
    def __init__(self, target_names: list[str], workloads: list[Workload], settings: Settings,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)):
        self.target_names = target_names
        self.workloads = workloads
        self.settings = settings
        self.log = log
        self.states: dict[str, TargetState] = {}
        self.runs: list[dict] = []

    def run(self) -> dict:
        s = self.settings
        s.workdir.mkdir(parents=True, exist_ok=True)
        started = datetime.now(UTC)
        self.host = host_info()
        with ExitStack() as stack:
            work = Path(tempfile.mkdtemp(prefix="run-", dir=s.workdir))
            stack.callback(shutil.rmtree, work, True)
            live = self._start_all(work, stack)
            for r in range(1, s.runs + 1):
                for w in self.workloads:
                    for t in live:
                        self._one(t, w, r, work)
        return self._results(started)

    def _start_all(self, work: Path, stack: ExitStack) -> list[Target]:
        s = self.settings
        live = []
        for name in self.target_names:
            cls = REGISTRY[name]
            state = self.states[name] = TargetState(name, cls.description)
            target = cls(work, s.size)
            reason = target.unavailable()
            if reason:
                state.status, state.reason = "skipped", reason
                self.log(f"skip {name}: {reason}")
                continue
            stack.callback(target.stop)
            try:
                state.uri = target.start()
                state.command = target.command
                state.export_size = target.export_size()
                # One source per export size (a LUKS export could be smaller than its file),
                # so every target of that size holds the very same data.
                source = work / f"random-{state.export_size}.bin"
                if not source.exists():
                    self.log(f"writing {state.export_size >> 20} MiB of random data for the pre-fill")
                    write_random_file(source, state.export_size)
                state.prefill_seconds = target.fill(source)
                # Written back before the next target starts, so that no image is
                # allocated and laid out while another's writeback is under way. Without
                # it the second of two identical servers was the slower one, run after run
                # (1.5 vs 2.6 GiB/s on sequential writes).
                os.sync()
            except (ServerStartError, subprocess.SubprocessError, OSError, ValueError) as e:
                state.status, state.reason = "failed", _one_line(e)
                state.command = target.command
                self.log(f"FAILED {name}: {state.reason}")
                target.stop()
                continue
            self.log(f"up {name}: {state.uri} (pre-filled {state.export_size >> 20} MiB "
                     f"in {state.prefill_seconds:.1f}s)")
            live.append(target)
        if not live:
            raise RuntimeError("no target could be started")
        return live

    def _one(self, target: Target, w: Workload, run: int, work: Path) -> None:
        s = self.settings
        if target.supports(w):
            return  # not a run: the medians show the pair as not applicable
        record: dict[str, Any] = {"target": target.name, "workload": w.name, "run": run}
        out = work / f"fio-{target.name}-{w.name}-{run}.json"
        size = self.states[target.name].export_size
        try:
            self._prepare_state(target, w, work, size)
            if target.uri:
                argv = fio.command(w, target.uri, size=size, runtime=s.runtime, ramp=s.ramp,
                                   output=str(out))
            else:
                argv = fio.device_command(w, str(target.image), size=size, runtime=s.runtime,
                                          ramp=s.ramp, output=str(out))
            pid = target.pid
            cpu_before = process_tree_cpu(pid) if pid else None
            client_before, host_before = children_cpu(), cpu_times()
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=s.runtime + s.ramp + 120)
            client_after, host_after = children_cpu(), cpu_times()
            cpu_after = process_tree_cpu(pid) if pid else None
            if done.returncode:
                raise fio.FioOutputError(f"fio exit {done.returncode}: {done.stderr.strip()[-300:]}")
            record.update(fio.sample(fio.parse_report(out.read_text()), w).as_dict())
            if cpu_before is not None and cpu_after is not None:
                record["server_cpu_s"] = round(cpu_after - cpu_before, 3)
                record["cpu_us_per_io"] = cpu_us_per_io(cpu_after - cpu_before, record["iops"],
                                                        s.runtime + s.ramp)
            record["client_cpu_us_per_io"] = cpu_us_per_io(client_after - client_before,
                                                           record["iops"], s.runtime + s.ramp)
            record["host_busy"] = busy_share(host_before, host_after)
            # The device target has no server: fio is all the CPU an I/O costs.
            server_us = record.get("cpu_us_per_io") if pid else 0.0
            record["cpu_bound_iops"] = cpu_bound_iops(os.cpu_count() or 1, server_us,
                                                      record["client_cpu_us_per_io"])
            cpu = record.get("cpu_us_per_io")
            client = record["client_cpu_us_per_io"]
            self.log(f"run {run}/{s.runs} {w.name:17} {target.name:14} "
                     f"{record['bw_bytes'] / (1 << 20):9.1f} MiB/s {record['iops']:10.0f} IOPS "
                     f"p50 {record['clat_p50_us']:8.1f} p99 {record['clat_p99_us']:8.1f} "
                     f"p99.9 {record['clat_p999_us'] or 0:8.1f} us"
                     + (f" cpu {cpu:6.1f} us/io" if cpu is not None else "")
                     + (f" client {client:6.1f} us/io" if client is not None else ""))
        except (fio.FioOutputError, ServerStartError, subprocess.SubprocessError, OSError) as e:
            record["error"] = _one_line(e)
            self.log(f"run {run}/{s.runs} {w.name:17} {target.name:14} ERROR {record['error']}")
        self.runs.append(record)

    def _prepare_state(self, target: Target, w: Workload, work: Path, size: int) -> None:
        """Put the image in the workload's state (module docstring)."""
        if w.state == "cold":
            reason = cold_unavailable()
            if reason:
                raise OSError(reason)
            # A server that mapped its image keeps those pages through drop_caches.
            if target.pid:
                target.restart()
            drop_caches()
            return
        # Write back what the previous run left dirty, so the kernel's flusher does not
        # spend this run's CPU on another target's data (2 cores: it shows).
        os.sync()
        if w.state == "seqfill":
            out = work / f"fill-{target.name}-{w.name}.json"
            done = subprocess.run(fio.sequential_fill(_uri_of(target), size=size, output=str(out)),
                                  capture_output=True, text=True, timeout=1800)
            if done.returncode:
                raise fio.FioOutputError(f"sequential fill: fio exit {done.returncode}: "
                                         f"{done.stderr.strip()[-300:]}")
            # On disk before the run, and deliberately not read back: the page cache keeps
            # what the sequential writes left, which is the state measured.
            os.sync()
            return
        # Every run starts with its image wholly in the page cache: while a target waits
        # its turn the host may evict its pages (this machine runs DAMON with a `pageout`
        # scheme for cold memory, up to 128 MiB/s), and a run that first had to read them
        # back would measure that, not the server.
        warm(target.image)

    def _results(self, started: datetime) -> dict:
        s = self.settings
        ok = [n for n in self.target_names if self.states[n].status == "ok"]
        names = [w.name for w in self.workloads]
        return {
            "date": started.isoformat(timespec="seconds"),
            "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
            "host": {**self.host, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
            "fio_version": fio.version_string(tool_version(["fio", "--version"])),
            "tools": {"nbdkit": tool_version(["nbdkit", "--version"]),
                      "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
                      "nbdcopy": tool_version(["nbdcopy", "--version"])},
            "settings": {"runs": s.runs, "runtime_s": s.runtime, "ramp_s": s.ramp,
                         "size_bytes": s.size, "reference": s.reference,
                         "ioengine": "nbd", "direct": 0, "device_jobs": fio.DEVICE_JOBS},
            "workloads": [{"name": w.name, "rw": w.rw, "bs": w.block_size, "iodepth": w.iodepth,
                           "numjobs": w.numjobs, "state": w.state,
                           "description": w.description, "headline": w.headline} for w in self.workloads],
            "targets": {n: vars(st) for n, st in self.states.items()},
            "runs": self.runs,
            "medians": reduce(self.runs, ok, names, s.reference),
        }


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())[:500]
