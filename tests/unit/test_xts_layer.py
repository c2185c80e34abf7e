"""XtsLayer over a real FileBackend on a temporary sparse file."""

import errno
import itertools
import os
import random
import struct
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserver.backend import Extent, FileBackend
from nbdserver.crypto import SECTOR_SIZE as S
from nbdserver.crypto import InvalidKey, XtsLayer, generate_dek
from nbdserver.crypto.layer import CHUNK, clip_extents, sector_extents
from nbdserver.crypto.sector_locks import SECTORS_PER_STRIPE
from tests.helpers.images import dmcrypt_sector

SIZE = 64 * S  # 256 KiB


@pytest.fixture(params=["writeback", "none"], ids=["cache-writeback", "cache-none"])
def disk(request, tmp_path):
    """(layer, path, key copy): a fresh encrypted disk, in each cache mode (none:
    O_DIRECT below, aligned scratch and staging buffers); closed afterwards."""
    if request.param == "none" and "nowait" in request.node.name:
        pytest.skip("O_DIRECT refuses every nowait write (test_backend_direct.py)")
    key = generate_dek()
    keep = bytes(key)
    path = tmp_path / "disk.img"
    layer = XtsLayer(FileBackend(path, size=SIZE, cache=request.param), key)
    yield layer, path, keep
    layer.close()


def read(layer, offset, length):
    buf = bytearray(length)
    layer.pread(memoryview(buf), offset)
    return bytes(buf)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_backing_file_is_dmcrypt_aes_xts_plain64_4k(disk):
    layer, path, key = disk
    plain = os.urandom(3 * S)
    layer.pwrite(plain, 5 * S)
    data = file_bytes(path)
    for i in range(3):
        assert data[(5 + i) * S:(6 + i) * S] == dmcrypt_sector(key, 5 + i, plain[i * S:(i + 1) * S])
    assert len(data) == SIZE  # no header, nothing else


def test_round_trips_random_ranges_including_512_byte_unaligned(disk):
    layer, _, _ = disk
    rng = random.Random(11)
    model = bytearray(SIZE)
    for i in range(400):
        if i % 2:
            off = rng.randrange(0, SIZE // 512) * 512
            n = min(rng.randrange(1, 20) * 512, SIZE - off)
        else:
            off = rng.randrange(0, SIZE - 1)
            n = rng.randrange(1, min(3 * S, SIZE - off) + 1)
        data = rng.randbytes(n)
        layer.pwrite(data, off)
        model[off:off + n] = data
        roff = rng.randrange(0, SIZE - 1)
        rn = rng.randrange(1, min(5 * S, SIZE - roff) + 1)
        assert read(layer, roff, rn) == model[roff:roff + rn]
    assert read(layer, 0, SIZE) == model


def test_requests_larger_than_a_chunk(tmp_path):
    size = 3 * CHUNK
    layer = XtsLayer(FileBackend(tmp_path / "big", size=size), generate_dek())
    try:
        data = os.urandom(CHUNK + CHUNK // 2 + 1000)
        layer.pwrite(data, 700)
        assert read(layer, 700, len(data)) == data
        assert read(layer, 0, 700) == bytes(700)
    finally:
        layer.close()


def test_backing_file_never_holds_the_plaintext(disk):
    layer, path, _ = disk
    marker = b"PLAINTEXT-MARKER"
    pattern = marker * (S // len(marker))
    for off in (0, 512, 3 * S - 100, 10 * S, 20 * S + 1):
        layer.pwrite(pattern[:3000], off)
    layer.pwrite(pattern * 4, 30 * S)
    layer.flush()
    data = file_bytes(path)
    assert data.count(marker[:8]) == 0 and data.count(marker[8:]) == 0
    assert read(layer, 30 * S, 4 * S) == pattern * 4


def test_wrong_key_reads_garbage_and_holes_stay_zero(disk, tmp_path):
    layer, path, _ = disk
    plain = b"secret sector contents " * 200
    layer.pwrite(plain, S)
    layer.flush()
    other = XtsLayer(FileBackend(path), generate_dek())
    try:
        got = read(other, S, len(plain))
        assert got != plain and got.count(b"secret") == 0
        assert read(other, 10 * S, S) == bytes(S)  # never written: zeros, not decrypted
    finally:
        other.close()


def test_holes_read_as_zeros_and_show_in_block_status(disk):
    layer, _, _ = disk
    assert read(layer, 0, SIZE) == bytes(SIZE)
    assert layer.block_status(0, SIZE) == [Extent(SIZE, hole=True, zero=True)]
    layer.pwrite(b"x" * 100, 4 * S + 10)  # a partial write allocates its whole sector
    ext = layer.block_status(0, SIZE)
    assert ext == [Extent(4 * S, hole=True, zero=True), Extent(S),
                   Extent(SIZE - 5 * S, hole=True, zero=True)]
    assert layer.block_status(4 * S + 100, 50) == [Extent(50)]
    assert layer.block_status(100, 5 * S) == [Extent(4 * S - 100, hole=True, zero=True),
                                             Extent(S), Extent(100, hole=True, zero=True)]


def test_trim_and_zero_punch_holes_and_rmw_partial_ends(disk):
    layer, path, _ = disk
    data = os.urandom(16 * S)
    layer.pwrite(data, 0)
    layer.trim(2 * S, 3 * S)
    layer.zero(8 * S - 512, 2 * S + 1024)  # partial sector at each end, two whole ones
    model = bytearray(data)
    model[2 * S:5 * S] = bytes(3 * S)
    model[8 * S - 512:10 * S + 512] = bytes(2 * S + 1024)
    assert read(layer, 0, 16 * S) == model
    holes = [e for e in FileBackend(path, readonly=True).block_status(0, SIZE) if e.hole]
    assert sum(e.length for e in holes) == SIZE - 16 * S + 3 * S + 2 * S
    assert layer.block_status(2 * S, 3 * S) == [Extent(3 * S, hole=True, zero=True)]
    assert layer.block_status(8 * S, 2 * S) == [Extent(2 * S, hole=True, zero=True)]
    layer.zero(12 * S, S, may_trim=False)  # NO_HOLE: stays allocated, still reads zeros
    assert read(layer, 12 * S, S) == bytes(S)
    model[12 * S:13 * S] = bytes(S)
    layer.trim(14 * S + 100, 200)  # inside one sector: RMW only
    model[14 * S + 100:14 * S + 300] = bytes(200)
    assert read(layer, 0, 16 * S) == model


def test_grows_in_place_over_a_file_extended_first(disk):
    """An online resize (nbdserver/platform/sizing.py): the new end reads as zeros, takes
    writes that read back as dm-crypt's sectors, and block status covers it; the data and
    the key before it stay. The layer never extends the file itself."""
    layer, path, key = disk
    layer.pwrite(b"a" * S, (SIZE // S - 1) * S)
    assert read(layer, 0, SIZE)[-S:] == b"a" * S  # a large read: the file's mapping, if any, is made
    with pytest.raises(OSError) as e:
        layer.grow(2 * SIZE)  # the file is still SIZE bytes long
    assert e.value.errno == errno.EINVAL and layer.size == SIZE
    os.truncate(path, 2 * SIZE)
    with pytest.raises(OSError):
        layer.grow(2 * SIZE - 512)  # not whole sectors
    layer.grow(2 * SIZE)
    assert layer.size == 2 * SIZE
    assert read(layer, SIZE - S, 2 * S) == b"a" * S + bytes(S)
    assert layer.block_status(SIZE, SIZE) == [Extent(SIZE, hole=True, zero=True)]
    plain = os.urandom(CHUNK // 4)  # read back past the mapping's end: pread takes it
    layer.pwrite(plain, 2 * SIZE - len(plain))
    assert read(layer, 2 * SIZE - len(plain), len(plain)) == plain
    assert file_bytes(path)[-S:] == dmcrypt_sector(key, 2 * SIZE // S - 1, plain[-S:])
    with pytest.raises(OSError):
        layer.grow(SIZE)  # never smaller


def test_refuses_bad_keys(tmp_path):
    lower = FileBackend(tmp_path / "d", size=SIZE)
    with pytest.raises(InvalidKey, match="halves"):
        XtsLayer(lower, bytearray(b"k" * 64))
    with pytest.raises(InvalidKey, match="64 bytes"):
        XtsLayer(lower, bytearray(32))
    with pytest.raises(TypeError, match="bytearray"):
        XtsLayer(lower, bytes(generate_dek()))
    lower.close()


def test_refuses_a_size_that_is_not_whole_sectors(tmp_path):
    lower = FileBackend(tmp_path / "d", size=SIZE + 512)
    with pytest.raises(OSError, match="multiple of 4096") as e:
        XtsLayer(lower, generate_dek())
    assert e.value.errno == errno.EINVAL
    lower.close()


def test_close_wipes_the_key_and_refuses_io(tmp_path):
    key = generate_dek()
    layer = XtsLayer(FileBackend(tmp_path / "d", size=SIZE), key)
    layer.pwrite(b"a" * S, 0)
    assert key != bytearray(64)
    layer.close()
    assert key == bytearray(64)
    layer.close()  # idempotent
    with pytest.raises(OSError) as e:
        read(layer, 0, S)
    assert e.value.errno == errno.ESHUTDOWN


def test_capabilities_come_from_the_lower_layer(tmp_path):
    FileBackend(tmp_path / "d", size=SIZE).close()
    ro = XtsLayer(FileBackend(tmp_path / "d", readonly=True), generate_dek())
    try:
        assert not ro.capabilities.writable and not ro.capabilities.trim
        assert ro.capabilities.extents and ro.size == SIZE
    finally:
        ro.close()


class NoNowaitWrites(FileBackend):
    """A real file backend whose writes always need a worker (like large FUA writes)."""

    def pwrite(self, data, offset, *, fua=False, nowait=False, owned=False):
        if nowait:
            raise BlockingIOError(errno.EAGAIN, "use a worker")
        super().pwrite(data, offset, fua=fua)

    def native_write(self, length, *, fua=False, nowait=False):
        return None  # its pwrite is not a plain pwritev2 any more


def test_nowait_blocking_propagates_before_anything_is_written(tmp_path):
    path = tmp_path / "d"
    layer = XtsLayer(NoNowaitWrites(path, size=SIZE), generate_dek())
    try:
        layer.pwrite(b"o" * (3 * S), 0)
        before = file_bytes(path)
        with pytest.raises(BlockingIOError):
            layer.pwrite(b"n" * (S + 1024), 512, nowait=True)  # head RMW, body, tail RMW
        assert file_bytes(path) == before
        with pytest.raises(BlockingIOError):  # several chunks: refused up front
            layer.pwrite(bytes(CHUNK + S), 0, nowait=True)
        layer.pwrite(b"n" * (S + 1024), 512)  # what the server then does on a worker
        assert read(layer, 0, 3 * S) == b"o" * 512 + b"n" * (S + 1024) + b"o" * (2 * S - 1536)
    finally:
        layer.close()


def test_an_owned_buffer_refused_with_nowait_is_handed_back_as_plaintext(tmp_path):
    """The server hands its WRITE payload over (`owned=True`), so the layer encrypts it in
    place; when the lower layer then refuses the nowait write, the server retries the
    same buffer on a worker, so it must hold the plaintext again."""
    path = tmp_path / "d"
    layer = XtsLayer(NoNowaitWrites(path, size=SIZE), generate_dek())
    try:
        data = bytearray(os.urandom(2 * S))
        original = bytes(data)
        with pytest.raises(BlockingIOError):
            layer.pwrite(data, S, nowait=True, owned=True)
        assert data == original
        layer.pwrite(data, S, owned=True)  # the worker's retry: encrypted in place, written
        assert data != original
        assert read(layer, S, 2 * S) == original
        assert original not in file_bytes(path)
    finally:
        layer.close()


@pytest.mark.parametrize("first, count", [(3, 1), (0, 16), (15, 2), (20, 32), (31, 32)])
@pytest.mark.parametrize("native", [True, False])
def test_owned_whole_sector_writes_land_as_dmcrypt_on_either_path(tmp_path, first, count,
                                                                  native):
    """Handed-over whole-sector writes take pwrite's short path when they fit one lock
    stripe (16 sectors) and the lower layer writes natively to one fd; stripe-crossing
    ones, and lower layers without `native_write`, take the general path. Same result."""
    key = generate_dek()
    keep = bytes(key)
    path = tmp_path / "d"
    lower = FileBackend(path, size=SIZE) if native else NoNativeWrite(path, size=SIZE)
    layer = XtsLayer(lower, key)
    try:
        plain = os.urandom(count * S)
        layer.pwrite(bytearray(plain), first * S, owned=True, nowait=True)
        assert read(layer, first * S, count * S) == plain
    finally:
        layer.close()
    data = file_bytes(path)
    for i in range(count):
        s = first + i
        assert data[s * S:(s + 1) * S] == dmcrypt_sector(keep, s, plain[i * S:(i + 1) * S])


@pytest.mark.timeout(30)  # a regression waits on a lock this thread holds: fail soon
@pytest.mark.parametrize("offset, length, owned", [
    (3 * S, S, True),        # the short path
    (3 * S, S, False),       # whole sectors, one stripe
    (15 * S, 2 * S, True),   # whole sectors over two stripes
    (3 * S + 512, 512, False),  # read-modify-write
])
def test_nowait_does_not_wait_for_sectors_another_write_holds(disk, offset, length, owned):
    """The server runs small writes on its event loop (nowait), which must not wait
    for a worker that holds the same sectors (an RMW, a whole-disk trim): BlockingIOError,
    nothing written and an owned buffer untouched, so the server retries on a worker.
    This thread holds the locks itself, so a wait would hang the test (a non-reentrant
    lock), not pass it."""
    layer, path, _ = disk
    before = file_bytes(path)
    plain = os.urandom(length)
    data = bytearray(plain)
    first, end = offset // S, -(-(offset + length) // S)
    held = layer._locks.acquire(first, end)
    try:
        with pytest.raises(BlockingIOError):
            layer.pwrite(data, offset, nowait=True, owned=owned)
    finally:
        layer._locks.release(held)
    assert file_bytes(path) == before and data == plain
    layer.pwrite(data, offset, nowait=True, owned=owned)  # free again: written inline
    assert read(layer, offset, length) == plain


@pytest.mark.timeout(30)
def test_a_staged_write_does_not_wait_for_its_sectors_with_nowait(disk):
    layer, path, _ = disk
    plain = os.urandom(16 * S)
    stage = layer.stage_write(16 * S, len(plain))
    stage.take(memoryview(plain))
    held = layer._locks.acquire(20, 21)
    try:
        with pytest.raises(BlockingIOError):
            stage.commit(nowait=True)
    finally:
        layer._locks.release(held)
    assert file_bytes(path)[16 * S:32 * S] == bytes(16 * S)
    stage.commit()  # the worker's retry
    assert read(layer, 16 * S, len(plain)) == plain


def test_the_short_path_is_open_only_over_a_writable_file(tmp_path):
    """pwrite's short path needs the file's fd, learnt at open; a read-only file, one
    that refuses nowait writes, or one that does not write natively gets none, and
    every write of theirs takes the general path (which asks per write)."""
    path = tmp_path / "d"
    cases = [(FileBackend(path, size=SIZE), True),
             (FileBackend(path, readonly=True), False),
             (NoNowaitWrites(path, size=SIZE), False),
             (NoNativeWrite(path, size=SIZE), False)]
    for lower, short in cases:
        layer = XtsLayer(lower, generate_dek())
        try:
            assert layer._small_write_fd == (lower.fileno() if short else None), type(lower)
        finally:
            layer.close()


@pytest.mark.parametrize("first, count, owned", [(3, 1, True), (15, 2, True), (3, 1, False)])
def test_whole_sector_writes_land_while_their_stripe_lock_is_held(tmp_path, first, count, owned):
    """Whole-sector writes need no RMW but must still hold their sectors' stripe locks,
    or one could land between another write's RMW read and its write-back and be lost.
    A probe lock looks at the file as the lock is taken and as it is released."""
    key = generate_dek()
    keep = bytes(key)
    path = tmp_path / "d"
    layer = XtsLayer(FileBackend(path, size=SIZE), key)
    plain = os.urandom(count * S)
    want = dmcrypt_sector(keep, first, plain[:S])
    seen = []

    class ProbeLock:
        def __init__(self):
            self._lock = threading.Lock()

        def acquire(self, *args):
            got = self._lock.acquire(*args)
            seen.append(("taken", file_bytes(path)[first * S:(first + 1) * S] == want))
            return got

        def release(self):
            seen.append(("released", file_bytes(path)[first * S:(first + 1) * S] == want))
            self._lock.release()

        def __enter__(self):
            return self.acquire()

        def __exit__(self, *exc):
            self.release()

    stripes = layer._locks._locks  # the layer's own list: replace its lock in place
    stripes[first // SECTORS_PER_STRIPE % len(stripes)] = ProbeLock()
    try:
        layer.pwrite(bytearray(plain) if owned else plain, first * S, owned=owned)
    finally:
        layer.close()
    assert seen == [("taken", False), ("released", True)]


class NoNativeWrite(FileBackend):
    def native_write(self, length, *, fua=False, nowait=False):
        return None


def test_the_native_write_path_refuses_before_touching_an_owned_buffer(tmp_path):
    """Over a plain file the layer encrypts and writes in one engine call; a refusal
    (nowait for a write too large for the loop, a read-only disk) comes before it."""
    path = tmp_path / "d"
    layer = XtsLayer(FileBackend(path, size=SIZE), generate_dek())
    try:
        big = bytearray(os.urandom(256 << 10))   # over INLINE_WRITE_MAX
        original = bytes(big)
        with pytest.raises(BlockingIOError):
            layer.pwrite(big, 0, nowait=True, owned=True)
        assert big == original
        layer.pwrite(big, 0, owned=True, fua=True)
        assert read(layer, 0, len(original)) == original
        assert original[:4096] not in file_bytes(path)
    finally:
        layer.close()
    ro = XtsLayer(FileBackend(path, readonly=True), generate_dek())
    try:
        data = bytearray(S)
        with pytest.raises(OSError) as refused:
            ro.pwrite(data, 0, owned=True)
        assert refused.value.errno == errno.EPERM and data == bytes(S)
    finally:
        ro.close()


def stamp(thread, seq, piece):
    return struct.pack("<IIQ", thread + 1, seq, piece) * 32  # 512 bytes


def test_concurrent_overlapping_unaligned_writes_never_lose_or_tear(disk):
    """Eight threads write 512-byte-stamped pieces into the same two sectors, mixing
    unaligned (RMW) and whole-sector writes. Each thread writes in sequence, so in every
    serial order the final value of a 512-byte piece is the LAST write of some thread to
    that piece. An unlocked RMW writes back a stale copy of its neighbours' pieces, which
    leaves an older stamp (or, torn, no valid stamp at all): both fail the check."""
    layer, _, _ = disk
    base, sectors, threads, rounds = 8 * S, 2, 8, 400
    pieces = sectors * S // 512
    last = [dict() for _ in range(pieces)]  # piece -> {thread: seq of its last write}
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def writer(t):
        rng = random.Random(t)
        start.wait()
        for seq in range(rounds):
            if rng.random() < 0.25:
                first = rng.randrange(0, sectors) * (S // 512)
                count = S // 512
            else:
                first = rng.randrange(0, pieces)
                count = rng.randrange(1, min(10, pieces - first) + 1)
            data = b"".join(stamp(t, seq, p) for p in range(first, first + count))
            if count == S // 512 and first % count == 0 and seq % 2:
                # Whole sector, handed over as the server does: pwrite's short path,
                # which must take the same stripe lock as the RMWs.
                layer.pwrite(bytearray(data), base + first * 512, owned=True)
            else:
                layer.pwrite(data, base + first * 512)
            with lock:
                for p in range(first, first + count):
                    last[p][t] = seq

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: more interleavings inside an RMW
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    final = read(layer, base, sectors * S)
    for p in range(pieces):
        got = final[p * 512:(p + 1) * 512]
        allowed = {stamp(t, seq, p) for t, seq in last[p].items()} or {bytes(512)}
        assert got in allowed, f"piece {p}: lost or torn update"


def test_concurrent_rmw_of_neighbouring_pieces_loses_no_update(disk):
    """Eight threads share two sectors, each owning two 512-byte pieces of them (one per
    sector), and write only their own pieces: every write is an RMW of a sector that
    other threads are modifying too. Since nobody else writes a thread's pieces, it must
    always read back exactly its own last write; an RMW that is not serialised restores
    a stale copy of a neighbour's piece, which that neighbour then sees."""
    layer, _, _ = disk
    base, threads, rounds = 20 * S, 8, 600
    pieces = 2 * S // 512
    errors = []
    start = threading.Barrier(threads)

    def owner(t):
        mine = [p for p in range(pieces) if p % threads == t]
        current = {p: bytes(512) for p in mine}
        rng = random.Random(100 + t)
        start.wait()
        for seq in range(rounds):
            region = read(layer, base, 2 * S)
            for p in mine:
                if region[p * 512:(p + 1) * 512] != current[p]:
                    errors.append((t, seq, p))
                    return
            p = rng.choice(mine)
            current[p] = stamp(t, seq, p)
            layer.pwrite(current[p], base + p * 512)

    workers = [threading.Thread(target=owner, args=(t,)) for t in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_sector_extents_round_partial_holes_to_data():
    # lower: 100 B data, hole to 2 sectors + 100, data to end of sector 3, hole sector 4
    lower = [Extent(100), Extent(2 * S, hole=True, zero=True), Extent(S - 100),
             Extent(S, hole=True, zero=True)]
    assert sector_extents(lower, 0) == [Extent(S), Extent(S, hole=True, zero=True),
                                        Extent(S), Extent(S, hole=True, zero=True)]
    # a short lower reply that ends mid-sector: the partial sector is left out...
    assert sector_extents([Extent(S, hole=True, zero=True), Extent(10)], 0) == \
        [Extent(S, hole=True, zero=True)]
    # ...unless it is all there is, then it is data
    assert sector_extents([Extent(10, hole=True, zero=True)], 0) == [Extent(S)]
    assert clip_extents([Extent(S, hole=True), Extent(S)], 100, S) == \
        [Extent(S - 100, hole=True), Extent(100)]


OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 16 * S - 1), st.integers(1, 3 * S),
              st.integers(0, 255)),
    st.tuples(st.just("write512"), st.integers(0, 32 * 8 - 1), st.integers(1, 24),
              st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, 16 * S - 1), st.integers(1, 3 * S)),
    st.tuples(st.just("trim"), st.integers(0, 16 * S - 1), st.integers(1, 3 * S)),
    st.tuples(st.just("zero"), st.integers(0, 16 * S - 1), st.integers(1, 3 * S),
              st.booleans()),
)


FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # each example recreates its file


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.lists(OPS, max_size=25))
def test_random_request_sequences_match_a_memory_model(tmp_path, ops):
    check_against_model(tmp_path, ops)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.lists(OPS, max_size=80))
def test_random_request_sequences_soak(tmp_path, ops):
    check_against_model(tmp_path, ops)


def check_against_model(tmp_path, ops):
    """Apply ops to the layer and to a bytearray; every read, the final contents and
    every extent that claims zeros must agree with the bytearray."""
    size = 16 * S
    path = tmp_path / "model.img"
    if path.exists():
        path.unlink()
    layer = XtsLayer(FileBackend(path, size=size), generate_dek())
    model = bytearray(size)
    try:
        for op in ops:
            kind, off = op[0], op[1]
            if kind == "write512":
                off, n = op[1] * 512, op[2] * 512
            else:
                n = op[2]
            n = min(n, size - off)
            if kind.startswith("write"):
                data = bytes([op[3]]) * n
                # Handed over (owned, as the server does) on odd fill bytes: the short
                # path for whole sectors, the general one for the rest.
                layer.pwrite(bytearray(data), off, owned=bool(op[3] & 1))
                model[off:off + n] = data
            elif kind == "read":
                assert read(layer, off, n) == model[off:off + n]
            elif kind == "trim":
                layer.trim(off, n)
                model[off:off + n] = bytes(n)
            else:
                layer.zero(off, n, may_trim=op[3])
                model[off:off + n] = bytes(n)
        assert read(layer, 0, size) == model
        pos = 0
        while pos < size:
            for e in layer.block_status(pos, size - pos):
                if e.zero:
                    assert model[pos:pos + e.length] == bytes(e.length)
                pos += e.length
        assert pos == size
    finally:
        layer.close()


# -- staged writes: a large WRITE payload encrypted as it arrives (EncryptingStage)

def pieces(data: bytes, rng: random.Random, cuts: int):
    """`data` cut at `cuts` random points, some inside sectors, some next to each other."""
    points = sorted({0, len(data), *(rng.randrange(1, len(data)) for _ in range(cuts)),
                     S - 1, S, S + 1, 2 * S - 3})
    return [memoryview(data)[a:b] for a, b in itertools.pairwise(points) if a < b <= len(data)]


@pytest.mark.parametrize("in_place", [0.0, 0.7], ids=["taken", "mostly-received-in-place"])
@pytest.mark.parametrize("seed", range(6))
def test_a_staged_write_cut_anywhere_writes_dmcrypt_ciphertext(disk, seed, in_place):
    """Pieces are taken from the receive buffer (`take`) or, as the server's buffered
    protocol does with all but the first, received straight into the stage (`space`,
    `took`): each sector is encrypted once all of it is in, whichever way its bytes came."""
    layer, path, key = disk
    rng = random.Random(seed)
    first = rng.randrange(0, 40)
    count = rng.randrange(16, SIZE // S - first + 1)
    plain = rng.randbytes(count * S)
    stage = layer.stage_write(first * S, len(plain))
    assert stage is not None
    for piece in pieces(plain, rng, cuts=rng.choice([1, 5, 40])):
        if rng.random() >= in_place:
            stage.take(piece)
            continue
        room = stage.space()
        assert len(room) == len(plain) - stage.received
        room[:len(piece)] = piece
        stage.took(len(piece))
    assert stage.received == len(plain)
    stage.commit()
    on_disk = file_bytes(path)
    for i in range(count):
        s = first + i
        assert on_disk[s * S:(s + 1) * S] == dmcrypt_sector(key, s, plain[i * S:(i + 1) * S])
    assert read(layer, first * S, len(plain)) == plain


def test_a_stage_received_in_place_holds_only_ciphertext_of_whole_sectors(disk):
    """No plaintext of a whole sector stays in the stage's buffer once it arrived."""
    layer, _, key = disk
    plain = os.urandom(16 * S)
    stage = layer.stage_write(0, len(plain))
    stage.space()[:3 * S + 5] = plain[:3 * S + 5]
    stage.took(3 * S + 5)
    buffer = bytes(stage.buffer)
    for s in range(3):
        assert buffer[s * S:(s + 1) * S] == dmcrypt_sector(key, s, plain[s * S:(s + 1) * S])
    assert buffer[3 * S:3 * S + 5] == plain[3 * S:3 * S + 5]  # the split sector, until complete
    with pytest.raises(ValueError):
        stage.took(13 * S)  # more than is left
    with pytest.raises(ValueError):
        stage.took(0)


def test_a_stage_received_in_place_outlives_its_closed_disk_without_harm(tmp_path):
    path = tmp_path / "d"
    layer = XtsLayer(FileBackend(path, size=SIZE), generate_dek())
    stage = layer.stage_write(0, 32 * S)
    stage.space()[:10 * S + 7] = os.urandom(10 * S + 7)
    stage.took(10 * S + 7)
    layer.close()
    stage.space()[:22 * S - 7] = os.urandom(22 * S - 7)
    stage.took(22 * S - 7)  # received, not encrypted: the key is gone
    with pytest.raises(OSError) as refused:
        stage.commit()
    assert refused.value.errno == errno.EIO
    assert file_bytes(path) == bytes(os.path.getsize(path))


def test_stage_write_takes_only_whole_sectors_inside_an_open_disk(disk):
    layer, _, _ = disk
    assert layer.stage_write(512, 16 * S) is None          # unaligned start: RMW needed
    assert layer.stage_write(0, 16 * S + 512) is None      # unaligned end
    assert layer.stage_write(SIZE - S, 2 * S) is None      # past the end
    assert layer.stage_write(0, 0) is None
    assert layer.stage_write(SIZE - 16 * S, 16 * S) is not None


def test_a_staged_write_refused_with_nowait_commits_unchanged_on_a_worker(disk):
    layer, path, key = disk
    plain = os.urandom(48 * S)                              # over INLINE_WRITE_MAX
    stage = layer.stage_write(4 * S, len(plain))
    stage.take(memoryview(plain))
    with pytest.raises(BlockingIOError):
        stage.commit(nowait=True)
    assert file_bytes(path)[4 * S:5 * S] != dmcrypt_sector(key, 4, plain[:S])
    stage.commit(fua=True)                                  # the worker's retry
    assert read(layer, 4 * S, len(plain)) == plain


def test_a_stage_outlives_its_closed_disk_without_harm(tmp_path):
    """The key is revoked (the layer closed) while a WRITE is still arriving: the rest
    of the payload is taken without error, and the commit fails instead of writing."""
    path = tmp_path / "d"
    layer = XtsLayer(FileBackend(path, size=SIZE), generate_dek())
    stage = layer.stage_write(0, 32 * S)
    stage.take(memoryview(bytes(10 * S + 7)))
    layer.close()
    stage.take(memoryview(bytes(22 * S - 7)))
    with pytest.raises(OSError) as refused:
        stage.commit()
    assert refused.value.errno == errno.EIO
    assert file_bytes(path) == bytes(os.path.getsize(path))
    assert layer.stage_write(0, 32 * S) is None


def test_a_stage_refuses_more_bytes_than_its_write_and_an_early_commit(disk):
    layer, _, _ = disk
    stage = layer.stage_write(0, 16 * S)
    stage.take(memoryview(bytes(8 * S)))
    with pytest.raises(ValueError):
        stage.commit()
    with pytest.raises(ValueError):
        stage.take(memoryview(bytes(8 * S + 1)))
