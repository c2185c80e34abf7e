"""Every NBD command through libnbd (the reference client library), against the server
process: with structured and with simple replies, with FUA, and many requests in flight."""

from __future__ import annotations

import errno
import os

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

from tests.helpers.images import DISK_SIZE, ro_pattern  # noqa: E402

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def connect(uri: str, *, structured: bool = True, strict: bool = True):  # -> nbd.NBD
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context("base:allocation")
    if not strict:
        # Let requests through that libnbd would refuse itself, so the server judges them.
        h.set_strict_mode(0)
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated() == structured
    return h


def extents(h, length: int, offset: int = 0) -> list[tuple[int, int]]:
    """base:allocation as (length, flags) runs covering [offset, offset+length)."""
    out: list[tuple[int, int]] = []

    def cb(context, off, entries, err):
        assert context == "base:allocation"
        for i in range(0, len(entries), 2):
            out.append((entries[i], entries[i + 1]))
        return 0

    pos = offset
    while pos < offset + length:
        out_before = len(out)
        h.block_status(offset + length - pos, pos, cb)
        pos += sum(n for n, _ in out[out_before:])
    return out


def flags_at(runs, offset: int) -> int:
    pos = 0
    for n, f in runs:
        if pos <= offset < pos + n:
            return f
        pos += n
    raise AssertionError(f"offset {offset} not covered")


HOLE, ZERO = 1, 2


@pytest.fixture(params=[True, False], ids=["structured", "simple"])
def structured(request):
    return request.param


def test_write_read_flush_with_and_without_fua(server, structured):
    h = connect(server.uri("disk"), structured=structured)
    data = os.urandom(3 * MiB)
    h.pwrite(data, 5 * MiB)
    h.pwrite(b"\xab" * 4096, 20 * MiB, nbd.CMD_FLAG_FUA)
    h.pwrite(b"\xcd" * 512, 512)  # smallest aligned write
    h.flush()
    assert h.pread(len(data), 5 * MiB) == data
    assert h.pread(4096, 20 * MiB) == b"\xab" * 4096
    assert h.pread(1024, 0) == bytes(512) + b"\xcd" * 512
    assert h.pread(4096, DISK_SIZE - 4096) == bytes(4096)  # never written: zeros
    assert h.pread(32 * MiB, 0)[5 * MiB:8 * MiB] == data  # the largest request allowed
    h.shutdown()


def test_fua_is_accepted_on_every_command(server, structured):
    # doc/proto.md: once NBD_FLAG_SEND_FUA is negotiated the server MUST accept FUA on
    # all commands (clients are known to set it on reads), even if it only ignores it.
    h = connect(server.uri("disk"), structured=structured, strict=False)
    fua = nbd.CMD_FLAG_FUA
    h.pwrite(b"x" * 8192, 0, fua)
    assert h.pread(8192, 0, fua) == b"x" * 8192
    h.flush(fua)
    h.trim(4096, 4096, fua)
    h.zero(4096, 0, fua)
    h.cache(8192, 0, fua)
    if structured:
        h.block_status(8192, 0, lambda *a: 0, fua)
    assert h.pread(8192, 0) == bytes(8192)
    h.shutdown()


def test_trim_and_zero_make_holes_or_keep_data(server, structured, tmp_path):
    h = connect(server.uri("disk"), structured=structured)
    h.pwrite(b"\xff" * (8 * MiB), 0)
    h.trim(MiB, 1 * MiB)                                   # hole
    h.zero(MiB, 3 * MiB)                                   # hole (may trim)
    h.zero(MiB, 5 * MiB, nbd.CMD_FLAG_NO_HOLE)             # allocated zeros
    h.zero(MiB, 6 * MiB, nbd.CMD_FLAG_FAST_ZERO)           # fast: punching a hole is fast
    h.zero(MiB, 7 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    got = h.pread(8 * MiB, 0)
    for mib, want in enumerate([0xff, 0, 0xff, 0, 0xff, 0, 0, 0]):
        assert got[mib * MiB:(mib + 1) * MiB] == bytes([want]) * MiB, f"MiB {mib}"
    if structured:
        runs = extents(h, 8 * MiB)
        assert sum(n for n, _ in runs) == 8 * MiB
        assert flags_at(runs, 0) == 0
        assert flags_at(runs, 1 * MiB) == HOLE | ZERO
        assert flags_at(runs, 3 * MiB) == HOLE | ZERO
        assert flags_at(runs, 5 * MiB) & HOLE == 0, "NO_HOLE must keep the range allocated"
        assert flags_at(runs, 6 * MiB) == HOLE | ZERO
    h.shutdown()
    # The file itself agrees (an independent look at the same fact).
    fd = os.open(tmp_path / "disk.img", os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, 5 * MiB, os.SEEK_DATA) == 5 * MiB
    finally:
        os.close(fd)


def test_block_status_req_one_and_ranges(server):
    h = connect(server.uri("disk"))
    h.pwrite(b"d" * MiB, 2 * MiB)
    seen = []
    h.block_status(8 * MiB, 0, lambda ctx, off, e, err: seen.append(list(e)) or 0, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [[2 * MiB, HOLE | ZERO]]
    runs = extents(h, DISK_SIZE)
    assert runs[:2] == [(2 * MiB, HOLE | ZERO), (MiB, 0)]
    assert sum(n for n, _ in runs) == DISK_SIZE
    h.shutdown()


def test_cache_and_can_flags(server, structured):
    h = connect(server.uri("disk"), structured=structured)
    for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_fast_zero, h.can_cache,
                h.can_multi_conn):
        assert can(), can.__name__
    assert not h.is_read_only()
    h.cache(4 * MiB, 0)
    h.shutdown()


def test_read_only_export_refuses_writes_with_eperm(server, structured):
    h = connect(server.uri("ro"), structured=structured, strict=False)
    assert h.is_read_only()
    assert h.pread(8192, 4096) == ro_pattern(4096, 8192)
    for op in (lambda: h.pwrite(b"z" * 4096, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
        with pytest.raises(nbd.Error) as e:
            op()
        assert e.value.errnum == errno.EPERM
    assert h.pread(4096, 0) == ro_pattern(0, 4096)  # unchanged, connection still fine
    h.shutdown()


def test_64_requests_in_flight_complete_out_of_order_with_right_data(server, structured):
    h = connect(server.uri("disk"), structured=structured)
    # Mixed sizes: small ones finish inline, large ones on workers, so completions
    # overtake each other; every buffer must still hold its own data.
    sizes = [4096 if i % 3 else 1 * MiB for i in range(64)]
    offsets = [i * MiB for i in range(64)]
    payloads = [os.urandom(16) * (n // 16) for n in sizes]
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(p)), off,
                            flags=nbd.CMD_FLAG_FUA if i % 5 == 0 else 0)
               for i, (p, off) in enumerate(zip(payloads, offsets, strict=True))]
    order = drain(h, cookies)
    bufs = [nbd.Buffer(n) for n in sizes]
    cookies = [h.aio_pread(b, off) for b, off in zip(bufs, offsets, strict=True)]
    order += drain(h, cookies)
    for b, p in zip(bufs, payloads, strict=True):
        assert b.to_bytearray() == p
    h.shutdown()


def drain(h, cookies: list[int]) -> list[int]:
    """Run the handle until every command completed; the order they completed in."""
    pending = set(cookies)
    done = []
    while pending:
        if h.aio_in_flight() > 0:
            h.poll(5000)
        for c in list(pending):
            if h.aio_command_completed(c):  # raises nbd.Error if the command failed
                pending.discard(c)
                done.append(c)
    return done


def test_multi_conn_clients_see_each_others_flushed_writes(server):
    a, b = connect(server.uri("disk")), connect(server.uri("disk"))
    a.pwrite(b"m" * 4096, 12 * MiB)
    a.flush()
    assert b.pread(4096, 12 * MiB) == b"m" * 4096
    a.shutdown()
    b.shutdown()


def test_shutdown_finishes_pending_writes(server):
    h = connect(server.uri("disk"))
    for i in range(16):
        h.aio_pwrite(bytes([i + 1]) * 65536, i * 65536)
    h.shutdown()  # NBD_CMD_DISC after the writes; libnbd waits for their replies
    h2 = connect(server.uri("disk"))
    got = h2.pread(16 * 65536, 0)
    assert all(got[i * 65536:(i + 1) * 65536] == bytes([i + 1]) * 65536 for i in range(16))
    h2.shutdown()
    server.assert_healthy()
