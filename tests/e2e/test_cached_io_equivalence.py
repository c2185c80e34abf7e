"""The page-cache fast path changes no answer: the same pipelined mix of requests, sent
by libnbd to two servers on two copies of one encrypted disk, one with the native path
(nbdserver/cachedio.py) and one without (NBDSERVER_CACHED_IO=0), reads back the same
bytes as a model of the disk and leaves byte-identical files.

Each batch's requests cover disjoint ranges (NBD orders nothing between overlapping
requests in flight), and mix what the native path takes (whole-sector READs and small
WRITEs) with what it must leave to the usual path (unaligned and large WRITEs, FUA,
TRIM, WRITE_ZEROES, FLUSH, reads across stripes and over 128 KiB). Between batches,
native requests alone, one at a time and four at a time, are served by native sessions
(server.Connection._start_session), which each next mixed batch ends."""

from __future__ import annotations

import random

import pytest

from tests.helpers.images import dek_file
from tests.helpers.servers import BaselineServer, stop_healthy

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

pytestmark = pytest.mark.timeout(180)
S = 4096
SLOT = 256 * 1024  # each request of a batch stays in its own slot
SLOTS = 64
SIZE = SLOTS * SLOT


def random_batch(rng: random.Random) -> list[tuple]:
    ops: list[tuple] = []
    for slot in rng.sample(range(SLOTS), 24):
        base = slot * SLOT
        kind = rng.choice(["read", "read", "write", "write", "unaligned", "large", "fua",
                           "trim", "zero", "read-large"])
        if kind == "read":
            ops.append(("read", base + rng.randrange(0, 48) * S, rng.choice([1, 2, 4, 16]) * S))
        elif kind == "read-large":
            ops.append(("read", base, SLOT))
        elif kind == "write":
            n = rng.choice([1, 2, 4, 16]) * S
            ops.append(("write", base + rng.randrange(0, (SLOT - n) // S) * S, rng.randbytes(n), 0))
        elif kind == "unaligned":
            off = base + rng.randrange(0, SLOT // 2)
            ops.append(("write", off, rng.randbytes(rng.randrange(1, 3 * S)), 0))
        elif kind == "large":
            ops.append(("write", base, rng.randbytes(SLOT // 2), 0))
        elif kind == "fua":
            ops.append(("write", base + S, rng.randbytes(S), nbd.CMD_FLAG_FUA))
        elif kind == "trim":
            ops.append(("trim", base, 16 * S))
        else:
            ops.append(("zero", base + 2 * S, 3 * S))
    ops.append(("flush",))
    return ops


def native_batch(rng: random.Random) -> list[tuple]:
    """Only what the native path answers (whole-sector READs and small WRITEs in one
    stripe): a connection the fast path answers wholly is handed to a native session."""
    ops: list[tuple] = []
    for slot in rng.sample(range(SLOTS), 8):
        base = slot * SLOT + rng.randrange(0, 48) * S
        if rng.random() < 0.5:
            ops.append(("read", base, rng.choice([1, 2, 4]) * S))
        else:
            ops.append(("write", base - base % (16 * S), rng.randbytes(rng.choice([1, 2, 4]) * S), 0))
    return ops


def run_batch(h, ops) -> dict:
    """Send every request of the batch at once; the bytes each READ returned."""
    reads, cookies = {}, []
    for i, op in enumerate(ops):
        if op[0] == "read":
            buf = nbd.Buffer(op[2])
            reads[i] = buf
            cookies.append(h.aio_pread(buf, op[1]))
        elif op[0] == "write":
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(op[2])), op[1],
                                        flags=op[3]))
        elif op[0] == "trim":
            cookies.append(h.aio_trim(op[2], op[1]))
        elif op[0] == "zero":
            cookies.append(h.aio_zero(op[2], op[1]))
        else:
            cookies.append(h.aio_flush())
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)  # raises on an error reply
    return {i: buf.to_bytearray() for i, buf in reads.items()}


def apply(model: bytearray, ops) -> dict:
    """The model's answers to the batch's READs, then its writes applied."""
    answers = {i: bytes(model[op[1]:op[1] + op[2]]) for i, op in enumerate(ops) if op[0] == "read"}
    for op in ops:
        if op[0] == "write":
            model[op[1]:op[1] + len(op[2])] = op[2]
        elif op[0] in ("trim", "zero"):
            model[op[1]:op[1] + op[2]] = bytes(op[2])  # a trim reads as zeros here
    return answers


def test_the_native_path_changes_no_answer(tmp_path):
    _, keyfile = dek_file(tmp_path)
    servers = []
    try:
        for name, env in [("on", "1"), ("off", "0")]:
            spec = f"d={tmp_path / (name + '.img')},size={SIZE},key={keyfile}"
            servers.append(BaselineServer(tmp_path, [spec], name=f"nbd-{name}",
                                          env={"NBDSERVER_CACHED_IO": env}).start())
        handles = []
        for srv in servers:
            h = nbd.NBD()
            # No block size asked: the client may send byte-granular requests, which
            # the server then serves by read-modify-write (and min_block is 1).
            h.set_request_block_size(False)
            h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
            h.connect_uri(srv.uri("d"))
            handles.append(h)
        rng = random.Random(14)
        model = bytearray(SIZE)
        for _ in range(25):
            ops = random_batch(rng)
            want = apply(model, ops)
            for h in handles:
                assert run_batch(h, ops) == want
            # Then native requests one at a time (a native session serves them), and in
            # small pipelines, until the next mixed batch ends the session.
            for depth in (1, 1, 1, 4):
                ops = native_batch(rng)
                for start in range(0, len(ops), depth):
                    part = ops[start:start + depth]
                    want = apply(model, part)
                    for h in handles:
                        assert run_batch(h, part) == want
        for h in handles:
            h.shutdown()
        assert (tmp_path / "on.img").read_bytes() == (tmp_path / "off.img").read_bytes()
    finally:
        stop_healthy(servers)
