"""The pure transmission phase (nbdserver.protocol.transmission): parsing, checks, replies."""

from __future__ import annotations

import errno
import random
import struct
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.protocol.constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EPERM,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_MAGIC,
)
from nbdserver.protocol.transmission import (
    DIRECT_PAYLOAD_MIN,
    BadMagic,
    Oversized,
    Request,
    RequestParser,
    block_status_chunk,
    block_status_descriptors,
    check,
    check_rules,
    data_chunk_header,
    error_chunk,
    error_reply,
    hole_chunk,
    nbd_error,
    read_reply,
    read_reply_head,
    simple_reply,
)

SIZE = 1 << 20
RW = (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM
      | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN)
RO = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_CACHE


def raw(cmd, offset=0, length=0, flags=0, cookie=1, payload=b"", magic=NBD_REQUEST_MAGIC):
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload


# -- parsing
def test_requests_split_anywhere_parse_the_same():
    stream = raw(NBD_CMD_READ, 4096, 512, cookie=1) + raw(NBD_CMD_WRITE, 0, 8, cookie=2, payload=b"abcdefgh") \
        + raw(NBD_CMD_FLUSH, cookie=3)
    want = [Request(NBD_CMD_READ, 0, 1, 4096, 512), Request(NBD_CMD_WRITE, 0, 2, 0, 8, b"abcdefgh"),
            Request(NBD_CMD_FLUSH, 0, 3, 0, 0)]
    assert RequestParser().feed(stream) == want
    p = RequestParser()
    got = []
    for i in range(len(stream)):
        got += p.feed(stream[i:i + 1])
    assert got == want and p.buffered() == 0


def test_a_write_waits_for_the_last_byte_of_its_payload():
    p = RequestParser()
    assert p.feed(raw(NBD_CMD_WRITE, 0, 100, payload=b"x" * 30)) == []
    assert p.feed(b"y" * 69) == []
    assert p.feed(b"y" + raw(NBD_CMD_FLUSH, cookie=2)) == [
        Request(NBD_CMD_WRITE, 0, 1, 0, 100, b"x" * 30 + b"y" * 70), Request(NBD_CMD_FLUSH, 0, 2, 0, 0)]


def test_oversized_write_is_skipped_across_feeds():
    p = RequestParser(max_payload=1024)
    events = p.feed(raw(NBD_CMD_WRITE, 0, 5000, cookie=9) + raw(NBD_CMD_READ) * 10)  # payload lookalikes
    assert events == [Oversized(NBD_CMD_WRITE, 0, 9, 0, 5000)]
    skipped = 10 * 28
    assert p.feed(b"\0" * (5000 - skipped - 1)) == []
    assert p.feed(b"\0" + raw(NBD_CMD_FLUSH, cookie=10)) == [Request(NBD_CMD_FLUSH, 0, 10, 0, 0)]
    assert p.buffered() == 0


def test_the_parser_says_when_the_next_byte_begins_a_request():
    """What the server's page-cache fast path asks before it parses a chunk itself: a
    refused payload being skipped must never be read as requests (its bytes may be any)."""
    p = RequestParser(max_payload=1024)
    assert p.at_boundary()
    p.feed(raw(NBD_CMD_READ)[:10])  # part of a header
    assert not p.at_boundary()
    p.feed(raw(NBD_CMD_READ)[10:])
    assert p.at_boundary()
    p.feed(raw(NBD_CMD_WRITE, 0, 5000, cookie=9) + b"\0" * 100)  # skipping
    assert not p.at_boundary()
    p.feed(b"\0" * 4900)
    assert p.at_boundary()
    p.feed(raw(NBD_CMD_WRITE, 0, 100, payload=b"x" * 30))  # a payload in part
    assert not p.at_boundary()
    p.feed(b"y" * 70)
    assert p.at_boundary()
    big = RequestParser()
    big.feed(raw(NBD_CMD_WRITE, 0, 128 * 1024, payload=b"x" * 1000))  # a large one in part
    assert not big.at_boundary()


class RecordingStage:
    """A consumer's stage that keeps what it is given, and checks it is given no more."""

    def __init__(self, offset, length):
        self.offset, self.length = offset, length
        self.data = bytearray()
        self.pieces = 0

    def take(self, view):
        assert isinstance(view, memoryview)
        self.data += view
        self.pieces += 1
        assert len(self.data) <= self.length

    def space(self):
        return None  # takes pieces only


class InPlaceStage(RecordingStage):
    """A stage that can also be received into in place, as the encrypting one can."""

    def __init__(self, offset, length):
        super().__init__(offset, length)
        self.room = bytearray(length)
        self.in_place = 0

    def take(self, view):
        self.room[len(self.data):len(self.data) + len(view)] = view
        super().take(view)

    def space(self):
        return memoryview(self.room)[len(self.data):]

    def took(self, n):
        assert 0 < n <= self.length - len(self.data)
        self.data += self.room[len(self.data):len(self.data) + n]
        self.in_place += n


def buffered_reader(p, stream, rng):
    """Read `stream` as the server's buffered protocol does: before each receive, ask
    for the payload's room, receive at most that much into it, else a chunk of any size
    into a buffer that is then fed."""
    got, at, in_place = [], 0, 0
    while at < len(stream):
        n = rng.randrange(1, DIRECT_PAYLOAD_MIN // 2)  # so every large payload spans reads
        room = p.payload_space()
        if room is None:
            got += p.feed(stream[at:at + n])
            at += n
            continue
        n = min(n, len(room), len(stream) - at)
        room[:n] = stream[at:at + n]
        got += p.payload_received(n)
        at += n
        in_place += n
    return got, in_place

@pytest.mark.parametrize("seed", range(8))
def test_large_writes_go_to_the_consumers_stage_piece_by_piece(seed):
    rng = random.Random(seed)
    big = [rng.randbytes(DIRECT_PAYLOAD_MIN + rng.randrange(0, 3 * DIRECT_PAYLOAD_MIN)) for _ in range(3)]
    small = rng.randbytes(DIRECT_PAYLOAD_MIN - 1)
    declined = rng.randbytes(DIRECT_PAYLOAD_MIN)
    stream = (raw(NBD_CMD_WRITE, 0, len(big[0]), cookie=1, payload=big[0])
              + raw(NBD_CMD_WRITE, 1 << 20, len(small), cookie=2, payload=small)
              + raw(NBD_CMD_WRITE, 2 << 20, len(big[1]), cookie=3, payload=big[1])
              + raw(NBD_CMD_FLUSH, cookie=4)
              + raw(NBD_CMD_WRITE, 3 << 20, len(declined), cookie=5, payload=declined)
              + raw(NBD_CMD_WRITE, 4 << 20, len(big[2]), cookie=6, payload=big[2]))
    stages = []

    def stage(offset, length):
        if offset == 3 << 20:
            return None  # the consumer declines: this payload comes as a bytearray
        stages.append(RecordingStage(offset, length))
        return stages[-1]

    p = RequestParser(stage=stage)
    got = []
    cuts = sorted(rng.sample(range(1, len(stream)), 60))
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += p.feed(stream[a:b])
    assert p.buffered() == 0
    assert [r.cookie for r in got] == [1, 2, 3, 4, 5, 6]
    staged = {r.cookie: r for r in got if r.stage is not None}
    assert sorted(staged) == [1, 3, 6]
    for cookie, data in zip((1, 3, 6), big, strict=True):
        r = staged[cookie]
        assert r.payload is None and r.stage.data == data and r.stage.length == len(data)
        assert r.stage.offset == r.offset
    assert got[1].payload == small and got[1].stage is None
    assert type(got[4].payload) is bytearray and got[4].payload == declined
    assert any(s.pieces > 1 for s in stages)


@pytest.mark.parametrize("seed", range(8))
def test_a_buffered_reader_receives_large_payloads_in_place(seed):
    rng = random.Random(seed)
    big = [rng.randbytes(DIRECT_PAYLOAD_MIN + rng.randrange(0, 3 * DIRECT_PAYLOAD_MIN)) for _ in range(4)]
    small = rng.randbytes(DIRECT_PAYLOAD_MIN - 1)
    stream = (raw(NBD_CMD_WRITE, 0, len(big[0]), cookie=1, payload=big[0])
              + raw(NBD_CMD_WRITE, 1 << 20, len(small), cookie=2, payload=small)
              + raw(NBD_CMD_WRITE, 2 << 20, len(big[1]), cookie=3, payload=big[1])
              + raw(NBD_CMD_FLUSH, cookie=4)
              + raw(NBD_CMD_WRITE, 3 << 20, len(big[2]), cookie=5, payload=big[2])
              + raw(NBD_CMD_WRITE, 4 << 20, len(big[3]), cookie=6, payload=big[3]))
    stages = []

    def stage(offset, length):
        if offset == 3 << 20:
            return None  # declined: a payload buffer of the parser's, received into in place too
        stages.append((InPlaceStage if offset != 4 << 20 else RecordingStage)(offset, length))
        return stages[-1]

    p = RequestParser(stage=stage)
    got, in_place = buffered_reader(p, stream, rng)
    assert p.buffered() == 0 and p.payload_space() is None
    assert [r.cookie for r in got] == [1, 2, 3, 4, 5, 6]
    assert [bytes(r.stage.data) for r in got if r.stage is not None] == [big[0], big[1], big[3]]
    assert got[1].payload == small
    assert type(got[4].payload) is bytearray and got[4].payload == big[2]
    # Every byte received in place went to a stage with room or to the declined payload.
    staged_in_place = sum(s.in_place for s in stages if isinstance(s, InPlaceStage))
    assert staged_in_place > 0 and staged_in_place <= in_place <= staged_in_place + len(big[2])
    assert stages[-1].pieces >= 1  # a stage without room took its pieces as before


def test_payload_received_refuses_what_was_not_asked():
    p = RequestParser()
    with pytest.raises(RuntimeError):
        p.payload_received(1)
    p.feed(raw(NBD_CMD_WRITE, 0, DIRECT_PAYLOAD_MIN, payload=b"x" * 100))
    room = p.payload_space()
    assert len(room) == DIRECT_PAYLOAD_MIN - 100
    with pytest.raises(ValueError):
        p.payload_received(len(room) + 1)
    with pytest.raises(ValueError):
        p.payload_received(0)
    room[:] = b"y" * len(room)
    [r] = p.payload_received(len(room))
    assert r.payload == b"x" * 100 + b"y" * (DIRECT_PAYLOAD_MIN - 100)
    assert p.payload_space() is None and p.at_boundary()


def test_a_payload_that_arrives_whole_is_staged_too():
    payload = bytes(range(256)) * (DIRECT_PAYLOAD_MIN // 256)
    stages = []
    p = RequestParser(stage=lambda off, n: stages.append(RecordingStage(off, n)) or stages[-1])
    [r] = p.feed(raw(NBD_CMD_WRITE, 8192, len(payload), payload=payload))
    assert r.payload is None and r.stage.data == payload and r.stage.pieces == 1


def test_bad_magic():
    p = RequestParser()
    events = p.feed(raw(NBD_CMD_READ, cookie=1) + raw(NBD_CMD_READ, magic=0x12345678) + raw(NBD_CMD_READ))
    assert events == [Request(NBD_CMD_READ, 0, 1, 0, 0), BadMagic(0x12345678)]
    assert p.broken


# -- checks
def req(cmd, offset=0, length=512, flags=0):
    return Request(cmd, flags, 1, offset, length)


GOOD = [
    (req(NBD_CMD_READ), RW), (req(NBD_CMD_READ, flags=NBD_CMD_FLAG_FUA), RW),
    (req(NBD_CMD_WRITE, SIZE - 512, 512, NBD_CMD_FLAG_FUA), RW),
    (req(NBD_CMD_FLUSH, 0, 0), RW), (req(NBD_CMD_FLUSH, 0, 0, NBD_CMD_FLAG_FUA), RW),
    (req(NBD_CMD_TRIM, 0, SIZE, NBD_CMD_FLAG_FUA), RW),
    (req(NBD_CMD_WRITE_ZEROES, 0, SIZE, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA), RW),
    (req(NBD_CMD_CACHE, 0, SIZE), RW), (req(NBD_CMD_CACHE), RO),
    (req(NBD_CMD_BLOCK_STATUS, 0, SIZE, NBD_CMD_FLAG_REQ_ONE), RW),
    (req(NBD_CMD_BLOCK_STATUS, flags=NBD_CMD_FLAG_FUA), RW),  # FUA is valid on every command
    (req(NBD_CMD_READ, 0, 32 << 20), RW),  # the largest read allowed
]


@pytest.mark.parametrize("request_,tflags", GOOD)
def test_valid_requests_pass(request_, tflags):
    size = 64 << 20 if request_.length > SIZE else SIZE
    assert check(request_, size, tflags, has_meta=True) == (0, "")


BAD = [
    (req(99), RW, NBD_EINVAL),                                           # unknown command
    (req(NBD_CMD_READ, flags=1 << 10), RW, NBD_EINVAL),                  # unknown flag
    (req(NBD_CMD_WRITE, flags=NBD_CMD_FLAG_NO_HOLE), RW, NBD_EINVAL),    # flag of another command
    (req(NBD_CMD_READ, flags=NBD_CMD_FLAG_DF), RW, NBD_EINVAL),          # DF not advertised
    (req(NBD_CMD_WRITE, flags=NBD_CMD_FLAG_FUA), RW & ~NBD_FLAG_SEND_FUA, NBD_EINVAL),
    (req(NBD_CMD_WRITE_ZEROES, flags=NBD_CMD_FLAG_FAST_ZERO), RW & ~NBD_FLAG_SEND_FAST_ZERO, NBD_EINVAL),
    (req(NBD_CMD_TRIM), RW & ~NBD_FLAG_SEND_TRIM, NBD_EINVAL),           # not advertised
    (req(NBD_CMD_FLUSH, 0, 0), RO, NBD_EINVAL),
    (req(NBD_CMD_WRITE), RO, NBD_EPERM),
    (req(NBD_CMD_TRIM), RO, NBD_EPERM),
    (req(NBD_CMD_WRITE_ZEROES), RO, NBD_EPERM),
    (req(NBD_CMD_READ, 100), RW, NBD_EINVAL),                            # misaligned offset
    (req(NBD_CMD_WRITE, 0, 1000), RW, NBD_EINVAL),                       # misaligned length
    (req(NBD_CMD_READ, SIZE - 512, 1024), RW, NBD_EINVAL),               # read past the end
    (req(NBD_CMD_TRIM, SIZE, 512), RW, NBD_EINVAL),
    (req(NBD_CMD_CACHE, SIZE, 512), RW, NBD_EINVAL),
    (req(NBD_CMD_WRITE, SIZE - 512, 1024), RW, NBD_ENOSPC),              # write past the end
    (req(NBD_CMD_WRITE_ZEROES, SIZE, 512), RW, NBD_ENOSPC),
    (req(NBD_CMD_WRITE, (1 << 64) - 512, 512), RW, NBD_ENOSPC),          # no wrap-around
    (req(NBD_CMD_READ, 0, (32 << 20) + 512), RW, NBD_EINVAL),            # over the maximum
    (req(NBD_CMD_BLOCK_STATUS, 0, 0), RW, NBD_EINVAL),
]


@pytest.mark.parametrize("request_,tflags,err", BAD)
def test_invalid_requests_get_the_spec_error(request_, tflags, err):
    got, message = check(request_, SIZE, tflags, has_meta=True)
    assert got == err and message


@pytest.mark.parametrize("request_", [
    req(NBD_CMD_READ, 4095, 1), req(NBD_CMD_WRITE, 7, 513), req(NBD_CMD_TRIM, 1, 3),
    req(NBD_CMD_WRITE_ZEROES, SIZE - 1, 1), req(NBD_CMD_CACHE, 3, 5),
])
def test_a_client_that_agreed_to_no_block_size_may_use_any_byte(request_):
    assert check(request_, SIZE, RW, has_meta=True, min_block=1) == (0, "")
    assert check(request_, SIZE, RW, has_meta=True, min_block=512)[0] == NBD_EINVAL


def test_byte_granular_requests_still_end_at_the_export_end():
    assert check(req(NBD_CMD_READ, SIZE - 1, 2), SIZE, RW, has_meta=True, min_block=1)[0] == NBD_EINVAL
    assert check(req(NBD_CMD_WRITE, SIZE - 1, 2), SIZE, RW, has_meta=True, min_block=1)[0] == NBD_ENOSPC


def test_block_status_needs_a_context():
    assert check(req(NBD_CMD_BLOCK_STATUS), SIZE, RW, has_meta=False)[0] == NBD_EINVAL


def test_errno_mapping():
    assert nbd_error(errno.EROFS) == NBD_EPERM
    assert nbd_error(errno.EDQUOT) == NBD_ENOSPC and nbd_error(errno.EFBIG) == NBD_ENOSPC
    assert nbd_error(errno.EOPNOTSUPP) == NBD_ENOTSUP
    assert nbd_error(errno.ELOOP) == NBD_EIO and nbd_error(None) == NBD_EIO


# -- replies
def test_simple_reply():
    assert simple_reply(7, NBD_EIO) == struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, NBD_EIO, 7)


def test_structured_chunks():
    def head(b):
        return struct.unpack_from(">IHHQI", b)
    h = data_chunk_header(3, 4096, 512, done=False)
    assert head(h) == (NBD_STRUCTURED_REPLY_MAGIC, 0, NBD_REPLY_TYPE_OFFSET_DATA, 3, 8 + 512)
    assert struct.unpack_from(">Q", h, 20) == (4096,) and len(h) == 28
    c = hole_chunk(3, 8192, 1024)
    assert head(c)[1:] == (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE, 3, 12)
    assert c[20:] == struct.pack(">QI", 8192, 1024)
    e = error_chunk(3, NBD_EINVAL, "x" * 5000)  # messages are capped at 4096 bytes
    assert head(e)[2] == NBD_REPLY_TYPE_ERROR
    assert struct.unpack_from(">IH", e, 20) == (NBD_EINVAL, 4096) and len(e) == 26 + 4096
    b = block_status_chunk(3, 1, [(4096, 3), (512, 0)])
    assert head(b)[2:] == (NBD_REPLY_TYPE_BLOCK_STATUS, 3, 4 + 16)
    assert b[20:] == struct.pack(">IIIII", 1, 4096, 3, 512, 0)


@given(st.sampled_from([NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES, NBD_CMD_CACHE,
                        NBD_CMD_FLUSH, NBD_CMD_BLOCK_STATUS, 99]),
       st.sampled_from([0, 0, 0, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_NO_HOLE, 0x8000]),
       st.sampled_from([0, 512, 1000, 4096, SIZE - 4096, SIZE, 2 ** 63]),
       st.sampled_from([0, 1, 512, 4096, 4097, 8192, 1 << 20]),
       st.sampled_from([RW, RO, NBD_FLAG_HAS_FLAGS]), st.booleans(), st.sampled_from([1, 512, 4096]))
@settings(max_examples=500, deadline=None)
def test_checks_quick_path_answers_as_every_rule_does(cmd, flags, offset, length, tflags, has_meta,
                                                      min_block):
    req = Request(cmd, flags, 1, offset, length)
    kw = dict(has_meta=has_meta, min_block=min_block, max_payload=8192)
    assert check(req, SIZE, tflags, **kw) == check_rules(req, SIZE, tflags, **kw)


# -- reply shaping: the exact bytes, built here from the spec's layouts
def simple(cookie, error=0):
    return struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_head(cookie, ctype, length, done):
    return struct.pack(">IHHQI", NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                       ctype, cookie, length)


def data_head(cookie, offset, n, done):
    return chunk_head(cookie, NBD_REPLY_TYPE_OFFSET_DATA, 8 + n, done) + struct.pack(">Q", offset)


def hole(cookie, offset, n, done):
    return chunk_head(cookie, NBD_REPLY_TYPE_OFFSET_HOLE, 12, done) + struct.pack(">QI", offset, n)


def test_an_error_is_a_chunk_with_its_message_only_when_structured():
    assert error_reply(9, NBD_ENOSPC, "full", structured=False) == simple(9, NBD_ENOSPC)
    assert error_reply(9, NBD_ENOSPC, "full", structured=True) == (
        chunk_head(9, NBD_REPLY_TYPE_ERROR, 6 + 4, True) + struct.pack(">IH", NBD_ENOSPC, 4) + b"full")


def test_a_read_in_one_piece_is_headed_by_one_last_data_chunk_or_a_simple_reply():
    assert read_reply_head(5, 12288, 65536, structured=False) == simple(5)
    assert read_reply_head(5, 12288, 65536, structured=True) == data_head(5, 12288, 65536, True)


PARTS = [(4096, 4096, b"a" * 4096), (8192, 8192, None), (16384, 512, memoryview(b"b" * 512))]


def test_a_structured_read_sends_holes_as_hole_chunks_and_marks_the_last_done():
    out = read_reply(7, PARTS, structured=True)
    assert b"".join(out) == (data_head(7, 4096, 4096, False) + b"a" * 4096
                             + hole(7, 8192, 8192, False)
                             + data_head(7, 16384, 512, True) + b"b" * 512)
    assert out[-1] is PARTS[-1][2]  # the data goes out as the backend left it, not copied


def test_a_structured_read_ending_in_a_hole_marks_the_hole_done():
    out = read_reply(7, [(0, 4096, b"c" * 4096), (4096, 4096, None)], structured=True)
    assert b"".join(out) == data_head(7, 0, 4096, False) + b"c" * 4096 + hole(7, 4096, 4096, True)


def test_a_simple_read_sends_its_holes_as_zeros():
    out = read_reply(7, PARTS, structured=False)
    assert b"".join(out) == simple(7) + b"a" * 4096 + bytes(8192) + b"b" * 512


class Run(NamedTuple):
    length: int
    hole: bool = False
    zero: bool = False


def test_block_status_flags_runs_and_merges_neighbours_with_the_same_flags():
    runs = [Run(4096), Run(4096), Run(8192, hole=True, zero=True), Run(512, zero=True),
            Run(4096, hole=True, zero=True)]
    assert block_status_descriptors(runs) == [
        (8192, 0), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO), (512, NBD_STATE_ZERO),
        (4096, NBD_STATE_HOLE | NBD_STATE_ZERO)]
    assert block_status_descriptors(runs, one=True) == [(4096, 0)]  # REQ_ONE: the first run
    assert block_status_descriptors([]) == []
    descriptors = block_status_descriptors(runs[2:4])
    assert block_status_chunk(3, 1, descriptors) == (
        chunk_head(3, NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 16, True)
        + struct.pack(">IIIII", 1, 8192, NBD_STATE_HOLE | NBD_STATE_ZERO, 512, NBD_STATE_ZERO))


# -- fuzz: only the documented events come out, nothing escapes
EVENTS = (Request, Oversized, BadMagic)
fields = st.tuples(st.sampled_from([NBD_REQUEST_MAGIC, NBD_REQUEST_MAGIC, 0]), st.integers(0, 0xffff),
                   st.integers(0, 10), st.integers(0, 2 ** 64 - 1),
                   st.sampled_from([0, 512, SIZE - 512, SIZE, 2 ** 64 - 512, 2 ** 63]),
                   st.sampled_from([0, 1, 512, 4096, 2000, 2 ** 32 - 1]))


@given(st.lists(st.one_of(st.binary(max_size=100),
                          fields.map(lambda f: struct.pack(">IHHQQI", f[0], f[1], f[2], f[3], f[4], f[5]))),
                max_size=20),
       st.sampled_from([RW, RO]), st.booleans())
@settings(max_examples=300, deadline=None)
def test_fuzz_parser_and_checks(chunks, tflags, has_meta):
    p = RequestParser(max_payload=4096)
    for c in chunks:
        for ev in p.feed(c):
            assert isinstance(ev, EVENTS)
            if isinstance(ev, Request):
                err, msg = check(ev, SIZE, tflags, has_meta=has_meta, max_payload=4096)
                assert isinstance(err, int) and err >= 0 and isinstance(msg, str)
                if err == 0 and ev.cmd in (NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM,
                                           NBD_CMD_WRITE_ZEROES, NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS):
                    assert ev.offset + ev.length <= SIZE and ev.offset % 512 == 0
                if ev.cmd == NBD_CMD_WRITE:
                    assert len(ev.payload) == ev.length
            if isinstance(ev, BadMagic):
                assert p.broken
        assert p.buffered() < 28 + 4096
