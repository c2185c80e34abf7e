"""What the NBD server counts per export, in plain ints: the hot path's side of metrics.

The server counts each request as it starts it (`requests`, `bytes`: a few list
increments inline in its loop, nbdserver/server.py), each failure as it answers it
(`failed`), and the latency of one request in LATENCY_SAMPLE (`timed`);
nbdserver/metrics.py turns these into Prometheus metrics at scrape time. Only the event
loop writes here, so nothing is locked.

Why sampled latency: timing every request (a clock read as it starts, its start kept
until its reply, a second read and a method call then) cost several times what counting
it does, a share of the server's CPU per I/O that `scripts/bench` could see. The server
times every LATENCY_SAMPLE-th request of each connection (by its start number, so no one
command is favoured), one at a time: a completion tests only whether it is that request.

An I/O worker process counts on its own copy of the export and sends what it counted
to the main process every second (`take`, `merge`). NBDSERVER_IO_STATS=0 turns the
counting off: how its overhead is measured (docs/operations.md, "Monitoring").
"""

from __future__ import annotations

import os

from daemonkit.latency import Latency

ENABLED = os.environ.get("NBDSERVER_IO_STATS", "1") != "0"
LATENCY_SAMPLE = 16  # a power of two: the server tests a mask
LATENCY_MASK = LATENCY_SAMPLE - 1
# NBD_CMD_READ .. NBD_CMD_BLOCK_STATUS are 0..7 (doc/proto.md, "Request types"); any
# other command number (refused with EINVAL) is counted in the last slot.
COMMANDS = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status",
            "other")
OTHER_CMD = len(COMMANDS) - 1


class ExportStats:
    __slots__ = ("requests", "bytes", "latency", "errors")

    def __init__(self) -> None:
        self.requests = [0] * len(COMMANDS)  # started (the server writes these itself)
        self.bytes = [0] * len(COMMANDS)  # the ranges they cover: moved, trimmed, zeroed
        self.latency = [Latency() for _ in COMMANDS]  # of the sampled requests
        self.errors: dict[int, int] = {}  # NBD error number -> failed requests

    def _reset(self) -> None:
        """Back to zero, the lists in place: the server holds them through a batch."""
        self.requests[:] = [0] * len(COMMANDS)
        self.bytes[:] = [0] * len(COMMANDS)
        self.latency = [Latency() for _ in COMMANDS]
        self.errors = {}

    def unstarted(self, cmd: int, length: int) -> None:
        """A request counted as started went back to wait (the buffer budget)."""
        cmd = min(cmd, OTHER_CMD)
        self.requests[cmd] -= 1
        self.bytes[cmd] -= length

    def timed(self, cmd: int, elapsed_ns: int) -> None:
        self.latency[min(cmd, OTHER_CMD)].observe_ns(elapsed_ns)

    def failed(self, error: int) -> None:
        self.errors[error] = self.errors.get(error, 0) + 1

    # -- an I/O worker process counts for the main process (nbdserver/ioworker.py)
    def take(self) -> dict | None:
        """What was counted since the last `take`, as JSON-able values, and zero again;
        None when nothing was. The main process `merge`s it into its own export."""
        if not any(self.requests) and not self.errors:
            return None
        out = {"cmds": {str(i): [self.requests[i], self.bytes[i], self.latency[i].counts,
                                 self.latency[i].sum_ns]
                        for i in range(len(COMMANDS)) if self.requests[i] or self.latency[i].sum_ns},
               "errors": {str(e): n for e, n in self.errors.items()}}
        self._reset()
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
