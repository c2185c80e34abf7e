"""Self-checking records for crash tests, and a client that knows what was made durable.

A record is one 4 KiB block: a magic, the cycle and sequence number, the slot it was
written to, filler derived from them, and a SHA-256 over all of it, so a block either is
exactly the record we wrote or is recognisably not.

`DurabilityClient` drives a libnbd handle with many requests in flight (writes with and
without FUA, flushes) and keeps, from the replies alone, the set of records the server
promised durable (doc/proto.md, "Ordering of messages and writes"):

- a write acknowledged with FUA is durable when its reply arrives;
- a FLUSH acknowledged makes durable every write whose reply arrived before the FLUSH
  was sent.

When told to, it kills the server (SIGKILL) from its own loop at the moment a given
number of replies has arrived: the kill is a condition of the workload, not a timer.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct

import nbd

BLOCK = 4096
MAGIC = b"RELREC01"
HEAD = struct.Struct("<8sIQQ")  # magic, cycle, seq, slot


def record(cycle: int, seq: int, slot: int) -> bytes:
    head = HEAD.pack(MAGIC, cycle, seq, slot)
    filler = hashlib.shake_256(head).digest(BLOCK - HEAD.size - 32)
    body = head + filler
    return body + hashlib.sha256(body).digest()


def parse(block: bytes) -> tuple[int, int, int] | None:
    """(cycle, seq, slot) of a valid record, None for anything else."""
    body, digest = block[:-32], block[-32:]
    if block[:8] != MAGIC or hashlib.sha256(body).digest() != digest:
        return None
    _, cycle, seq, slot = HEAD.unpack_from(block)
    return cycle, seq, slot


class DurabilityClient:
    """Writes records to slots base, base+1, ... with `depth` requests in flight."""

    def __init__(self, uri: str, cycle: int, base: int, rng: random.Random, *, depth: int = 32):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.cycle, self.base, self.rng, self.depth = cycle, base, rng, depth
        self.acked: list[int] = []          # seq of every write whose reply arrived (ok)
        self.durable: set[int] = set()      # seq the server promised durable
        self.replies = 0
        self.failed = 0                     # requests that failed (the kill)
        self._pending: dict[int, tuple] = {}
        self._seq = 0

    def slot(self, seq: int) -> int:
        return self.base + seq

    def _issue(self) -> None:
        r = self.rng.random()
        if r < 0.1 and self.acked:
            cookie = self.h.aio_flush()
            self._pending[cookie] = ("flush", frozenset(self.acked))
            return
        seq = self._seq
        self._seq += 1
        fua = r < 0.45
        data = record(self.cycle, seq, self.slot(seq))
        cookie = self.h.aio_pwrite(data, self.slot(seq) * BLOCK,
                                   flags=nbd.CMD_FLAG_FUA if fua else 0)
        self._pending[cookie] = ("fua" if fua else "write", seq)

    def _retire(self, cookie: int, what: tuple) -> None:
        kind, arg = what
        self.replies += 1
        if kind == "flush":
            self.durable |= arg
        else:
            self.acked.append(arg)
            if kind == "fua":
                self.durable.add(arg)

    def run(self, *, kill_pid: int | None = None, kill_after: int = 0, total: int = 0) -> None:
        """Until `total` replies (no kill), or until the server dies after `kill_after`."""
        killed = False
        while True:
            if not killed:
                while len(self._pending) < self.depth and (kill_pid or self.replies + len(self._pending) < total):
                    self._issue()
            if not self._pending:
                return
            try:
                self.h.poll(1000)
            except nbd.Error:
                break
            for cookie in list(self._pending):
                try:
                    done = self.h.aio_command_completed(cookie)
                except nbd.Error:
                    self.failed += 1
                    del self._pending[cookie]
                    continue
                if done:
                    self._retire(cookie, self._pending.pop(cookie))
            if kill_pid and not killed and self.replies >= kill_after:
                os.kill(kill_pid, signal.SIGKILL)
                killed = True
            if killed and not self.h.aio_is_ready() and not self.h.aio_is_processing():
                break
        # The connection is dead: whatever did not complete was not acknowledged.
        for cookie in list(self._pending):
            try:
                if self.h.aio_command_completed(cookie):
                    self._retire(cookie, self._pending.pop(cookie))
                    continue
            except nbd.Error:
                pass
            self.failed += 1
            del self._pending[cookie]

    def close(self) -> None:
        try:
            self.h.shutdown()
        except nbd.Error:
            pass


def verify(h, expected: dict[int, tuple[int, int]]) -> list[str]:
    """Problems with `expected` {slot: (cycle, seq)} as read through handle `h` (read in
    windows of 256 slots: one request per window, not per record)."""
    problems = []
    window = 256
    by_window: dict[int, list[int]] = {}
    for slot in expected:
        by_window.setdefault(slot // window, []).append(slot)
    size = h.get_size()
    for w, slots in sorted(by_window.items()):
        start = w * window * BLOCK
        data = h.pread(min(window * BLOCK, size - start), start)
        for slot in sorted(slots):
            cycle, seq = expected[slot]
            got = bytes(data[(slot - w * window) * BLOCK:(slot - w * window + 1) * BLOCK])
            if got != record(cycle, seq, slot):
                problems.append(f"slot {slot}: expected record {cycle}/{seq}, found {parse(got)}")
    return problems
