"""Property test: random request sequences through libnbd against the server process give
the same reads as an in-memory model of the disk (a bytearray)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

pytestmark = pytest.mark.timeout(240)
SIZE = 4 << 20
SECTOR = 512
MAX_LEN = 256 * 1024

sectors = st.integers(0, SIZE // SECTOR - 1)


@st.composite
def ranges(draw):
    start = draw(sectors) * SECTOR
    length = draw(st.integers(1, min(MAX_LEN, SIZE - start) // SECTOR)) * SECTOR
    return start, length


ops = st.one_of(
    st.tuples(st.just("pwrite"), ranges(), st.integers(1, 255), st.booleans()),
    st.tuples(st.just("pread"), ranges()),
    st.tuples(st.just("trim"), ranges(), st.booleans()),
    st.tuples(st.just("zero"), ranges(), st.sampled_from([0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO]),
              st.booleans()),
    st.tuples(st.just("flush")),
    st.tuples(st.just("block_status"), ranges()),
)


@pytest.fixture
def handles(server_factory, tmp_path):
    srv = server_factory([f"model={tmp_path / 'model.img'},size={SIZE}"])
    out = []
    for structured in (True, False):
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.add_meta_context("base:allocation")
        h.connect_uri(srv.uri("model"))
        out.append(h)
    yield out
    for h in out:
        h.shutdown()
    srv.assert_healthy()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(st.tuples(st.booleans(), ops), min_size=1, max_size=25))
def test_random_requests_match_the_model(handles, sequence):
    structured, simple = handles
    structured.zero(SIZE, 0)  # each example starts from an empty disk, as the model does
    model = bytearray(SIZE)
    for use_simple, op in sequence:
        h = simple if use_simple else structured
        kind = op[0]
        if kind == "pwrite":
            (off, n), byte, fua = op[1:]
            data = bytes([byte]) * n
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
            model[off:off + n] = data
        elif kind == "pread":
            off, n = op[1]
            assert h.pread(n, off) == model[off:off + n], f"read {n} at {off}"
        elif kind in ("trim", "zero"):
            (off, n), *rest = op[1:]
            fua = nbd.CMD_FLAG_FUA if rest[-1] else 0
            if kind == "trim":
                h.trim(n, off, fua)
            else:
                h.zero(n, off, rest[0] | fua)
            model[off:off + n] = bytes(n)  # this server's TRIM reads back as zeros
        elif kind == "flush":
            h.flush()
        else:
            off, n = op[1]
            claimed_zero = []

            def cb(ctx, start, entries, err):
                pos = start
                for i in range(0, len(entries), 2):
                    if entries[i + 1] & 2:  # NBD_STATE_ZERO: must really read as zeros
                        claimed_zero.append((pos, entries[i]))
                    pos += entries[i]
                return 0
            structured.block_status(n, off, cb)
            for start, length in claimed_zero:
                lo, hi = max(start, off), min(start + length, off + n)
                assert model[lo:hi] == bytes(hi - lo), f"extent {start}+{length} is not zero"
    assert structured.pread(SIZE, 0) == model
