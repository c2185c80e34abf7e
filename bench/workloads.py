"""The fio suite: each workload is one fio job shape, named, with the figure it is judged by,
and the state the data is in when it starts.

Shapes follow the usual block-device triplet: streaming (1 MiB at queue depth 4), random
small I/O under load (4 KiB at qd16), and the latency of one request at a time (4 KiB qd1),
where the completion-latency percentiles matter more than the rate.

States (`Workload.state`), because the same shape measures different things in each:
- `warm`: the image is wholly in the page cache (read back before the run), so the run
  measures the server's CPU cost per request, not storage.
- `cold`: every server is restarted (a process that mapped the file keeps its pages past
  `drop_caches`) and the page cache dropped before the run: the case of any disk larger
  than RAM, where reads reach the device and only a server that keeps many in flight
  at once gets near its speed.
- `seqfill`: the image is first written through the server with 1 MiB sequential writes
  (an image copy, mkfs, a restore) and not read back: ext4 then holds the file in large
  folios, and every small write walks their buffer heads.
Connections: `numjobs` fio jobs, each with its own NBD connection (multi-conn clients,
several VMs on one host), reported as one group.
"""

from __future__ import annotations

from dataclasses import dataclass

STATES = ("warm", "cold", "seqfill")


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str            # fio --rw: read, write, randread, randwrite
    block_size: int    # bytes
    iodepth: int       # per connection
    description: str
    state: str = "warm"
    numjobs: int = 1   # connections, one fio job each

    def __post_init__(self):
        if self.state not in STATES:
            raise ValueError(f"workload {self.name}: unknown state {self.state!r}")
        if self.numjobs < 1:
            raise ValueError(f"workload {self.name}: numjobs must be >= 1")

    @property
    def direction(self) -> str:
        """The fio JSON section holding this workload's numbers."""
        return "write" if "write" in self.rw else "read"

    @property
    def headline(self) -> str:
        """The figure a reader looks at first: bandwidth for streaming, latency at qd1,
        IOPS for the rest."""
        return headline(self.block_size, self.iodepth)


def headline(block_size: int, iodepth: int) -> str:
    if iodepth == 1:
        return "latency"
    return "bandwidth" if block_size >= 64 * 1024 else "iops"


KiB, MiB = 1 << 10, 1 << 20

# Ordered as they run within one repetition. Reads and writes alternate so that no target
# sees two long write phases back to back (dirty page writeback would spill into the next).
SUITE: dict[str, Workload] = {w.name: w for w in (
    Workload("seqread", "read", 1 * MiB, 4, "sequential read 1 MiB qd4"),
    Workload("seqwrite", "write", 1 * MiB, 4, "sequential write 1 MiB qd4"),
    Workload("randread", "randread", 4 * KiB, 16, "random read 4 KiB qd16"),
    Workload("randwrite", "randwrite", 4 * KiB, 16, "random write 4 KiB qd16"),
    Workload("randread-qd1", "randread", 4 * KiB, 1, "random read 4 KiB qd1 (latency)"),
    Workload("randwrite-qd1", "randwrite", 4 * KiB, 1, "random write 4 KiB qd1 (latency)"),
    Workload("randread-cold", "randread", 4 * KiB, 16, "random read 4 KiB qd16, cold cache",
             state="cold"),
    Workload("randwrite-seqfill", "randwrite", 4 * KiB, 16,
             "random write 4 KiB qd16 after a 1 MiB sequential fill", state="seqfill"),
    Workload("seqread-cold", "read", 1 * MiB, 4, "sequential read 1 MiB qd4, cold cache",
             state="cold"),
    Workload("randwrite-4conn", "randwrite", 4 * KiB, 16, "random write 4 KiB qd16 x 4 connections",
             numjobs=4),
    Workload("randread-4conn", "randread", 4 * KiB, 16, "random read 4 KiB qd16 x 4 connections",
             numjobs=4),
)}


def select(names: str | None) -> list[Workload]:
    """`"a,b"` -> those workloads in suite order; None or "all" -> the whole suite."""
    if not names or names == "all":
        return list(SUITE.values())
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SUITE]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(SUITE)}")
    return [w for w in SUITE.values() if w.name in wanted]
