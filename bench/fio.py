"""fio glue, pure: the command line for one workload against one NBD URI, and the parse of
fio's JSON report into a `Sample`. Running the process is the harness's business.

Settings that hold for every run, and why:
- `--ioengine=nbd` (libnbd inside fio): no kernel nbd device, so the client path is the
  same for every server and needs no root.
- `--numjobs=1`: the machine has two cores and the server under test needs one of them.
- `--direct=0`: the nbd engine has no page cache of its own; O_DIRECT means nothing to it.
- `--time_based --ramp_time`: fixed wall time per run, with the first second (connection,
  cache warm-up) left out of the figures.
- `--clat_percentiles=1 --percentile_list=50:99`: median and p99 completion latency.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .workloads import Workload

# fio keys its percentile table by the percentile printed with six decimals.
P50, P99 = "50.000000", "99.000000"


class FioOutputError(ValueError):
    """fio's output was not the JSON report we asked for, or the job itself failed."""


@dataclass(frozen=True)
class Sample:
    """One fio run's figures for the workload's direction."""
    iops: float
    bw_bytes: float
    clat_p50_us: float
    clat_p99_us: float

    def as_dict(self) -> dict:
        return asdict(self)


def command(workload: Workload, uri: str, *, size: int, runtime: float, ramp: float = 1,
            output: str | None = None, fio: str = "fio") -> list[str]:
    argv = [
        fio, f"--name={workload.name}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={workload.rw}", f"--bs={workload.block_size}", f"--iodepth={workload.iodepth}",
        "--numjobs=1", "--direct=0", f"--size={size}",
        "--time_based", f"--runtime={_seconds(runtime)}", f"--ramp_time={_seconds(ramp)}",
        "--clat_percentiles=1", "--percentile_list=50:99",
        "--output-format=json",
    ]
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
        )
    except (KeyError, TypeError) as e:
        raise FioOutputError(f"fio report lacks {e}") from None


def version_string(text: str) -> str:
    """`fio --version` prints e.g. "fio-3.33"."""
    return text.strip().removeprefix("fio-")
