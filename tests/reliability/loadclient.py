"""A load generator: many libnbd connections in one process, driven by one select loop.

    python -m tests.reliability.loadclient --seconds 30 --depth 4 --seed 1 --region-base 0 URI[#count] ...

Each connection owns a region of its export (so its reads have exactly one right answer)
and keeps `depth` requests in flight: writes of 4-64 KiB blocks tagged with (connection,
sequence), reads of blocks it wrote before (verified against the last write it was
acknowledged for), flushes. At the end it stops issuing, waits for every request to
complete, and prints one JSON line: ops, bytes, errors, mismatches, and `lost` (requests
issued that never completed; must be 0).
"""

from __future__ import annotations

import argparse
import json
import random
import select
import time
from typing import Any

import nbd

REGION = 1 << 20
SIZES = (4096, 16384, 65536)


def payload(conn: int, seq: int, length: int) -> bytes:
    unit = conn.to_bytes(4, "little") + seq.to_bytes(8, "little") + b"LOAD"
    return (unit * (length // 16 + 1))[:length]


class Conn:
    def __init__(self, uri: str, index: int, region: int, rng: random.Random, depth: int):
        # Read buffers are reused: this libnbd's Python binding never frees an nbd.Buffer
        # (5000 reads of 64 KiB kept 313 MiB), which took a long run's client to 12 GB.
        self.buffers = {n: [nbd.Buffer(n) for _ in range(depth)] for n in SIZES}
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.index, self.base, self.rng = index, region * REGION, rng
        self.pending: dict[int, tuple] = {}
        self.written: dict[int, tuple[int, int]] = {}  # offset -> (seq, length) acknowledged
        # Offsets with a request in flight: NBD lets the server reorder concurrent
        # requests, so a read and a write of one block in flight together have no single
        # right answer; the client never issues them together.
        self.inflight_offsets: set[int] = set()
        self.seq = 0

    def issue(self, stats) -> None:
        r = self.rng.random()
        done = [o for o in self.written if o not in self.inflight_offsets]
        if r < 0.45 and done:
            off = self.rng.choice(done)
            seq, length = self.written[off]
            buf = self.buffers[length].pop()
            c = self.h.aio_pread(buf, off)
            self.pending[c] = ("read", off, seq, length, buf)
            self.inflight_offsets.add(off)
        elif r < 0.5:
            c = self.h.aio_flush()
            self.pending[c] = ("flush",)
        else:
            length = self.rng.choice(SIZES)
            off = self.base + self.rng.randrange(REGION // 65536) * 65536
            if off in self.inflight_offsets:
                return
            self.seq += 1
            flags = nbd.CMD_FLAG_FUA if self.rng.random() < 0.2 else 0
            c = self.h.aio_pwrite(payload(self.index, self.seq, length), off, flags=flags)
            self.pending[c] = ("write", off, self.seq, length)
            self.inflight_offsets.add(off)
        stats["issued"] += 1

    def reap(self, stats) -> None:
        for cookie in list(self.pending):
            try:
                if not self.h.aio_command_completed(cookie):
                    continue
            except nbd.Error as e:
                stats["errors"] += 1
                stats.setdefault("error_samples", []).append(str(e))
                self._forget(self.pending.pop(cookie))
                continue
            op = self.pending.pop(cookie)
            stats["completed"] += 1
            if op[0] == "write":
                _, off, seq, length = op
                self.written[off] = (seq, length)
                stats["bytes"] += length
            elif op[0] == "read":
                _, off, seq, length, buf = op
                stats["bytes"] += length
                got = bytes(buf.to_bytearray())
                if got != payload(self.index, seq, length):
                    stats["mismatches"] += 1
                    stats.setdefault("mismatch_samples", []).append(
                        f"conn {self.index} offset {off}: expected seq {seq} len {length}, "
                        f"got conn {int.from_bytes(got[:4], 'little')} "
                        f"seq {int.from_bytes(got[4:12], 'little')} head {got[:16].hex()}")
            self._forget(op)

    def _forget(self, op) -> None:
        if op[0] in ("write", "read"):
            self.inflight_offsets.discard(op[1])
        if op[0] == "read":
            self.buffers[op[3]].append(op[4])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--region-base", type=int, default=0,
                    help="first 1 MiB region used on each export (separates client processes)")
    ap.add_argument("targets", nargs="+", help="URI#COUNT: COUNT connections to URI")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    conns: list[Conn] = []
    per_uri: dict[str, int] = {}
    for t in args.targets:
        uri, _, count = t.partition("#")
        for _ in range(int(count or 1)):
            region = per_uri.get(uri, args.region_base)
            per_uri[uri] = region + 1
            conns.append(Conn(uri, len(conns), region, random.Random(rng.random()), args.depth))
    print(json.dumps({"event": "connected", "connections": len(conns)}), flush=True)
    stats: dict[str, Any] = {"connections": len(conns), "issued": 0, "completed": 0, "errors": 0,
             "mismatches": 0, "bytes": 0}
    start = time.monotonic()
    deadline = start + args.seconds
    stopping = False
    while True:
        now = time.monotonic()
        if not stopping and now >= deadline:
            stopping = True
        busy = False
        rd, wr = [], []
        by_fd = {}
        for c in conns:
            if not stopping:
                while len(c.pending) < args.depth:
                    before = len(c.pending)
                    c.issue(stats)
                    if len(c.pending) == before:
                        break
            if c.pending:
                busy = True
            fd = c.h.aio_get_fd()
            by_fd[fd] = c
            d = c.h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                rd.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wr.append(fd)
        if stopping and not busy:
            break
        if stopping and now > deadline + 60:
            break  # what is still pending now is lost
        r, w, _ = select.select(rd, wr, [], 1.0)
        for fd in r:
            by_fd[fd].h.aio_notify_read()
        for fd in w:
            by_fd[fd].h.aio_notify_write()
        for fd in set(r) | set(w):
            by_fd[fd].reap(stats)
    elapsed = time.monotonic() - start
    stats["lost"] = sum(len(c.pending) for c in conns)
    stats["seconds"] = round(elapsed, 2)
    stats["iops"] = round(stats["completed"] / elapsed)
    stats["mib_s"] = round(stats["bytes"] / elapsed / (1 << 20), 1)
    stats["error_samples"] = stats.get("error_samples", [])[:5]
    stats["mismatch_samples"] = stats.get("mismatch_samples", [])[:5]
    for c in conns:
        try:
            c.h.shutdown()
        except nbd.Error:
            pass
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
