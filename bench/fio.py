"""fio glue, pure: the command line for one workload against one NBD URI, and the parse of
fio's JSON report into a `Sample`. Running the process is the harness's business.

Settings that hold for every run, and why:
- `--ioengine=nbd` (libnbd inside fio): no kernel nbd device, so the client path is the
  same for every server and needs no root.
- `--numjobs=` the workload's connections (1 but for the multi-connection workloads: the
  machine has two cores and the server under test needs one of them), with
  `--group_reporting`, so the report's one job is the sum of all connections.
- `--direct=0`: the nbd engine has no page cache of its own; O_DIRECT means nothing to it.
- `--time_based --ramp_time`: fixed wall time per run, with the first second (connection,
  cache warm-up) left out of the figures.
- `--clat_percentiles=1 --percentile_list=50:99:99.9`: median, p99 and p99.9 completion
  latency (the tail a request stuck behind others shows in).

`device_command` is the storage's own figure for the same shape: fio straight on a file
of the file system the images live in, `--ioengine=psync --direct=1 --numjobs=16` (16
threads, one synchronous request each, past the page cache): what a server that keeps
the client's queue depth in flight could reach on cold data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .workloads import Workload

# fio keys its percentile table by the percentile printed with six decimals.
P50, P99, P999 = "50.000000", "99.000000", "99.900000"
PERCENTILES = "50:99:99.9"
DEVICE_JOBS = 16


class FioOutputError(ValueError):
    """fio's output was not the JSON report we asked for, or the job itself failed."""


@dataclass(frozen=True)
class Sample:
    """One fio run's figures for the workload's direction."""
    iops: float
    bw_bytes: float
    clat_p50_us: float
    clat_p99_us: float
    clat_p999_us: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def command(workload: Workload, uri: str, *, size: int, runtime: float, ramp: float = 1,
            output: str | None = None, fio: str = "fio") -> list[str]:
    argv = [
        fio, f"--name={workload.name}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={workload.rw}", f"--bs={workload.block_size}", f"--iodepth={workload.iodepth}",
        f"--numjobs={workload.numjobs}", "--group_reporting", "--direct=0", f"--size={size}",
        *_common(runtime, ramp, output),
    ]
    return argv


def device_command(workload: Workload, path: str, *, size: int, runtime: float, ramp: float = 1,
                   output: str | None = None, fio: str = "fio") -> list[str]:
    """The same access pattern straight on a file, O_DIRECT, DEVICE_JOBS synchronous threads."""
    return [
        fio, f"--name={workload.name}-device", f"--filename={path}", "--ioengine=psync",
        "--direct=1", f"--numjobs={DEVICE_JOBS}", "--group_reporting",
        f"--rw={workload.rw}", f"--bs={workload.block_size}", f"--size={size}",
        *_common(runtime, ramp, output),
    ]


def sequential_fill(uri: str, *, size: int, output: str | None = None, fio: str = "fio") -> list[str]:
    """Write the whole export once through the server, 1 MiB at a time at qd4, as an image
    copy or mkfs would (the `seqfill` state)."""
    argv = [fio, "--name=seqfill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
            "--bs=1M", "--iodepth=4", "--numjobs=1", f"--size={size}", "--output-format=json"]
    if output:
        argv.append(f"--output={output}")
    return argv


def _common(runtime: float, ramp: float, output: str | None) -> list[str]:
    argv = ["--time_based", f"--runtime={_seconds(runtime)}", f"--ramp_time={_seconds(ramp)}",
            "--clat_percentiles=1", f"--percentile_list={PERCENTILES}", "--output-format=json"]
    if output:
        # A file, because the nbd engine prints "fio: connected to NBD server" on stdout.
        argv.append(f"--output={output}")
    return argv


def _seconds(value: float) -> str:
    # fio takes plain integers as seconds; fractions need an explicit unit.
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}ms"


def parse_report(text: str) -> dict:
    """The JSON document in fio's output, skipping any chatter printed before it."""
    start = text.find("{")
    if start < 0:
        raise FioOutputError("no JSON report in fio output")
    try:
        report = json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise FioOutputError(f"fio output is not valid JSON: {e}") from None
    if not isinstance(report, dict) or not report.get("jobs"):
        raise FioOutputError("fio report has no jobs")
    return report


def sample(report: dict, workload: Workload) -> Sample:
    """The figures of the report's first job, in the direction the workload measures."""
    job = report["jobs"][0]
    if job.get("error"):
        raise FioOutputError(f"fio job {job.get('jobname')!r} failed with error {job['error']}")
    try:
        side = job[workload.direction]
        clat = side["clat_ns"]
        pct = clat.get("percentile", {})
        if not side.get("total_ios", side.get("io_bytes", 0)) or P50 not in pct:
            raise FioOutputError(f"fio job did no {workload.direction} I/O")
        return Sample(
            iops=float(side["iops"]),
            bw_bytes=float(side["bw_bytes"]),
            clat_p50_us=pct[P50] / 1000,
            clat_p99_us=pct[P99] / 1000,
            # Absent from reports of fio runs that did not ask for it.
            clat_p999_us=pct[P999] / 1000 if P999 in pct else None,
        )
    except (KeyError, TypeError) as e:
        raise FioOutputError(f"fio report lacks {e}") from None


def version_string(text: str) -> str:
    """`fio --version` prints e.g. "fio-3.33"."""
    return text.strip().removeprefix("fio-")
