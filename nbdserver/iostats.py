"""What the NBD server counts per export, in plain ints: the hot path's side of metrics.

The server calls `ExportStats.done` once per request, as its reply is queued (or its
failure decided); nbdserver/metrics.py turns these into Prometheus metrics at scrape
time. Only the event loop writes here, so nothing is locked; a scrape on the same loop
sees a consistent enough picture (counters that only grow). An I/O worker process
counts on its own copy of the export and sends what it counted to the main process
every second (`take`, `merge`).

NBDSERVER_IO_STATS=0 turns the counting off (the requests' timestamps included), which
is how the overhead of counting is measured (docs/operations.md, "Monitoring").
"""

from __future__ import annotations

import os

from daemonkit.latency import Latency

ENABLED = os.environ.get("NBDSERVER_IO_STATS", "1") != "0"
# NBD_CMD_READ .. NBD_CMD_BLOCK_STATUS are 0..7 (doc/proto.md, "Request types"); any
# other command number (refused with EINVAL) is counted in the last slot.
COMMANDS = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status",
            "other")
_OTHER = len(COMMANDS) - 1


class ExportStats:
    __slots__ = ("requests", "bytes", "latency", "errors")

    def __init__(self) -> None:
        self._zero()

    def _zero(self) -> None:
        self.requests = [0] * len(COMMANDS)
        self.bytes = [0] * len(COMMANDS)  # of successful requests: what moved, or was trimmed
        self.latency = [Latency() for _ in COMMANDS]
        self.errors: dict[int, int] = {}  # NBD error number -> failed requests

    def done(self, cmd: int, length: int, elapsed_ns: int, error: int) -> None:
        if not 0 <= cmd < _OTHER:
            cmd = _OTHER
        self.requests[cmd] += 1
        self.latency[cmd].observe_ns(elapsed_ns)
        if error:
            self.errors[error] = self.errors.get(error, 0) + 1
        else:
            self.bytes[cmd] += length

    # -- an I/O worker process counts for the main process (nbdserver/ioworker.py)
    def take(self) -> dict | None:
        """What was counted since the last `take`, as JSON-able values, and zero again;
        None when nothing was. The main process `merge`s it into its own export."""
        used = [i for i, n in enumerate(self.requests) if n]
        if not used:
            return None
        out = {"cmds": {str(i): [self.requests[i], self.bytes[i], self.latency[i].counts,
                                 self.latency[i].sum_ns] for i in used},
               "errors": {str(e): n for e, n in self.errors.items()}}
        self._zero()
        return out

    def merge(self, taken: dict) -> None:
        for key, (requests, moved, counts, sum_ns) in taken["cmds"].items():
            i = int(key)
            if not 0 <= i < len(COMMANDS) or len(counts) != len(self.latency[i].counts):
                continue  # not from this version of the code: ignored, never a crash
            self.requests[i] += requests
            self.bytes[i] += moved
            h = self.latency[i]
            h.counts = [a + b for a, b in zip(h.counts, counts, strict=True)]
            h.sum_ns += sum_ns
        for key, n in taken["errors"].items():
            self.errors[int(key)] = self.errors.get(int(key), 0) + n
