"""The native read queues: nbdserver._readq.ReadQueue (cold reads on native threads)
and nbdserver._uring.RingQueue (the same API on io_uring), collected in batches; every
test runs on both (the `kind` fixture), plus how nbdserver/readqueue.py picks one.

Real files, real errors from the kernel (a directory's fd gives EISDIR, a closed fd
EBADF), and XtsLayer's decryption checked against its own pread (itself checked against
independent oracles in test_xts_oracle.py)."""

from __future__ import annotations

import errno
import os
import random
import select
import time

import pytest

from nbdserver import readqueue
from nbdserver._readq import ReadQueue
from nbdserver.backend import FileBackend
from nbdserver.crypto import XtsLayer, generate_dek
from nbdserver.crypto.double import join_keys
from tests.helpers.images import drop_cache
from tests.helpers.servers import wait_until

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
S = 4096


def collect_all(queue: ReadQueue, n: int, timeout: float = 20.0) -> dict:
    """Wait on the queue's eventfd, as the server's loop does, until n reads are back."""
    done: dict = {}
    deadline = time.monotonic() + timeout
    while len(done) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(done)} of {n} reads came back"
        select.select([queue.fileno()], [], [], left)
        for token, result in queue.collect():
            assert token not in done
            done[token] = result
    return done


def ring_error() -> OSError | None:
    return readqueue._ring_error()


@pytest.fixture(params=["threads", "uring"])
def kind(request) -> str:
    if request.param == "uring" and ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    return request.param


def make_queue(kind: str, depth: int):
    if kind == "uring":
        from nbdserver._uring import RingQueue
        return RingQueue(depth)
    return ReadQueue(depth)


@pytest.fixture
def queue(kind):
    q = make_queue(kind, 32)
    yield q
    q.close()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.img"
    data = os.urandom(8 * MiB + 1000)  # not a whole number of pages: a short last read
    path.write_bytes(data)
    return path, data


def test_many_reads_in_flight_all_come_back_right(queue, kind, data_file):
    path, data = data_file
    drop_cache(path)
    rng = random.Random(7)
    fd = os.open(path, os.O_RDONLY)
    try:
        wanted = {}
        for i in range(300):
            length = rng.choice([1, 512, S, 3 * S + 17, 64 * 1024])
            offset = rng.randrange(0, len(data) + 2 * S)  # some past the end of the file
            buf = bytearray(b"\xaa") * length
            wanted[i] = (buf, offset)
            queue.submit(i, buf, fd, offset)
        assert queue.in_flight == 300
        results = collect_all(queue, 300)
    finally:
        os.close(fd)
    for i, (buf, offset) in wanted.items():
        assert results[i] == len(buf)
        # Past the end of the file reads as zeros, like a hole (FileBackend.pread).
        expect = data[offset:offset + len(buf)]
        assert buf == expect + bytes(len(buf) - len(expect)), i
    assert queue.in_flight == 0
    if kind == "threads":
        assert 1 <= queue.threads <= 32
    else:  # 300 reads through 32 slots: the backlog fed the ring as slots came free
        assert queue.threads == 0 and queue.peak == 32


def test_cold_reads_overlap(queue, data_file):
    path, data = data_file
    drop_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        bufs = [bytearray(S) for _ in range(16)]
        for i, buf in enumerate(bufs):  # spread out, so no read is another's read-ahead
            queue.submit(i, buf, fd, i * (len(data) // 16))
        results = collect_all(queue, 16)
    finally:
        os.close(fd)
    assert all(r == S for r in results.values())
    # A serialized queue (the GIL-bound thread pool this replaced) would show 1.
    assert queue.peak > 1


def test_an_error_fails_only_its_own_read(queue, data_file, tmp_path):
    path, data = data_file
    good = os.open(path, os.O_RDONLY)
    directory = os.open(tmp_path, os.O_RDONLY)
    closed = os.open(path, os.O_RDONLY)
    os.close(closed)
    try:
        bufs = {name: bytearray(S) for name in ("good1", "dir", "closed", "good2")}
        queue.submit("good1", bufs["good1"], good, 0)
        queue.submit("dir", bufs["dir"], directory, 0)
        queue.submit("closed", bufs["closed"], closed, 0)
        queue.submit("good2", bufs["good2"], good, S)
        results = collect_all(queue, 4)
    finally:
        os.close(good)
        os.close(directory)
    assert results == {"good1": S, "dir": -errno.EISDIR, "closed": -errno.EBADF, "good2": S}
    assert bufs["good1"] == data[:S] and bufs["good2"] == data[S:2 * S]


def test_the_buffer_stays_pinned_until_collected(queue, data_file):
    path, _ = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(S)
        queue.submit("r", buf, fd, 0)
        # The thread writes through a raw pointer: the buffer must not move meanwhile.
        with pytest.raises(BufferError):
            buf.extend(b"x")
        collect_all(queue, 1)
        buf.extend(b"x")  # released by collect
    finally:
        os.close(fd)


def test_close_joins_and_hands_back_what_was_not_collected(kind, data_file):
    path, _ = data_file
    drop_cache(path)  # reads still in the kernel when close() comes
    q = make_queue(kind, 2)
    fd = os.open(path, os.O_RDONLY)
    try:
        bufs = [bytearray(S) for _ in range(50)]
        for i, buf in enumerate(bufs):
            q.submit(i, buf, fd, i * S)
        left = dict(q.close())
    finally:
        os.close(fd)
    # Each read either finished (S bytes) or never started (ECANCELED); none is lost.
    assert sorted(left) == list(range(50))
    assert set(left.values()) <= {S, -errno.ECANCELED}
    assert q.threads == 0 and q.close() == [] and q.collect() == []
    for buf in bufs:
        buf.extend(b"x")  # every buffer released
    with pytest.raises(ValueError):
        q.submit(99, bytearray(S), 0, 0)


def test_refuses_a_read_only_buffer_and_bad_arguments(queue):
    with pytest.raises(BufferError):
        queue.submit(1, b"immutable", 0, 0)
    with pytest.raises(ValueError):
        queue.submit(1, bytearray(S), -1, 0)
    with pytest.raises(ValueError):
        queue.submit(1, bytearray(S), 0, -5)
    with pytest.raises(ValueError):
        queue.submit(1, bytearray(S), 0, 0, transform=object())
    assert queue.in_flight == 0


# --- through the backends (BlockBackend.submit_read)

def test_file_backend_reads_natively(queue, data_file):
    path, data = data_file
    backend = FileBackend(path)
    try:
        buf = bytearray(3 * S)
        assert backend.submit_read(queue, buf, 5 * S + 3, "t")
        assert collect_all(queue, 1) == {"t": 3 * S}
        assert buf == data[5 * S + 3:8 * S + 3]
    finally:
        backend.close()


def test_o_direct_reads_of_any_alignment_go_through_the_bounce_buffer(queue, tmp_path):
    """cache=none: the queue reads an O_DIRECT fd. Aligned requests into aligned memory
    go straight in; an unaligned buffer, offset or length (the server's buffers are heap
    bytearrays; byte-granular clients) goes through the thread's aligned bounce buffer.
    Without it the kernel refuses them all with EINVAL."""
    from nbdserver.backend import aligned_buffer
    path = tmp_path / "direct.img"
    data = os.urandom(4 * MiB)
    path.write_bytes(data)
    backend = FileBackend(path, cache="none")
    try:
        rng = random.Random(11)
        cases = {"aligned": (aligned_buffer(2 * S), 3 * S)}
        for i in range(100):
            n = rng.choice([1, 511, S, 3 * S + 17, 64 * 1024])
            cases[i] = (bytearray(b"\xaa") * n, rng.randrange(0, len(data) + S))
        for token, (buf, offset) in cases.items():
            assert backend.submit_read(queue, buf, offset, token)
        results = collect_all(queue, len(cases))
        for token, (buf, offset) in cases.items():
            want = (data[offset:offset + len(buf)] + bytes(len(buf)))[:len(buf)]
            assert results[token] == len(buf) and bytes(buf) == want, token
        for bad in (-1, 3, 256, 3 * S, 2 << 20):
            with pytest.raises(ValueError, match="align"):
                queue.submit("bad", bytearray(S), backend.fileno(), 0, align=bad)
        # The kernel's own answer to an unaligned O_DIRECT read, which the bounce avoids.
        with pytest.raises(OSError) as e:
            os.preadv(backend.fileno(), [bytearray(S)[1:]], 0)
        assert e.value.errno == errno.EINVAL
    finally:
        backend.close()


def layer_key(layers: str) -> bytearray:
    """One DEK, or a double disk's two (double.py): the queue then runs both layers'
    decryption in one transform (_xts.chain_read_transform)."""
    return generate_dek() if layers == "single" else join_keys(generate_dek(), generate_dek())


@pytest.mark.parametrize("layers", ["single", "double"])
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_xts_layer_decrypts_on_the_queue_with_holes_as_zeros(queue, tmp_path, cache, layers):
    path = tmp_path / "enc.img"
    layer = XtsLayer(FileBackend(path, size=16 * MiB, cache=cache), layer_key(layers))
    try:
        plain = os.urandom(2 * MiB)
        layer.pwrite(plain, 4 * MiB)
        layer.flush()
        drop_cache(path)
        reads = {  # token: (offset, length)
            "data": (4 * MiB, 64 * 1024),
            "edge": (6 * MiB - S, 2 * S),        # last written sector, then a hole
            "hole": (10 * MiB, 4 * S),           # never written
            "many": (4 * MiB + 7 * S, 5 * S),
        }
        bufs = {}
        for token, (offset, length) in reads.items():
            bufs[token] = bytearray(b"\xee") * length
            assert layer.submit_read(queue, bufs[token], offset, token)
        results = collect_all(queue, len(reads))
        for token, (offset, length) in reads.items():
            assert results[token] == length
            expect = bytearray(length)
            layer.pread(expect, offset)
            assert bufs[token] == expect, token
        assert bufs["hole"] == bytes(4 * S)
        assert bufs["data"] == plain[:64 * 1024]
        # Unaligned reads need pread's scratch sector: refused, the caller uses a worker.
        assert not layer.submit_read(queue, bytearray(S), 4 * MiB + 512, "x")
        assert not layer.submit_read(queue, bytearray(100), 4 * MiB, "x")
        assert queue.in_flight == 0
    finally:
        layer.close()


def test_xts_layer_over_a_non_native_lower_layer_declines(queue, tmp_path):
    inner = XtsLayer(FileBackend(tmp_path / "i.img", size=MiB), generate_dek())
    outer = XtsLayer(inner, generate_dek())  # the lower layer transforms: no native read
    try:
        assert not outer.submit_read(queue, bytearray(S), 0, "x")
    finally:
        outer.close()


def test_a_closed_layer_refuses_up_front(queue, tmp_path):
    layer = XtsLayer(FileBackend(tmp_path / "c.img", size=MiB), generate_dek())
    layer.close()
    with pytest.raises(OSError) as e:
        layer.submit_read(queue, bytearray(S), 0, "x")
    assert e.value.errno == errno.ESHUTDOWN
    assert queue.in_flight == 0


@pytest.mark.parametrize("layers", ["single", "double"])
def test_a_read_keeps_the_engine_usable_after_the_layer_closes(queue, tmp_path, layers):
    """Belt and braces under the server's drain: a read holds its own OpenSSL contexts
    and references to the engines, so a close that came early frees nothing under it."""
    path = tmp_path / "e.img"
    layer = XtsLayer(FileBackend(path, size=MiB), layer_key(layers))
    plain = os.urandom(S)
    layer.pwrite(plain, 0)
    fd = os.dup(layer.lower.fileno())  # the file stays readable after the layer closes
    try:
        buf = bytearray(S)
        transform = layer._cipher.read_transform()
        queue.submit("r", buf, fd, 0, transform, 0)
        layer.close()
        del transform, layer  # the queue's reference is what keeps the engines now
        assert collect_all(queue, 1) == {"r": S}
        assert buf == plain
    finally:
        os.close(fd)
    # A closed engine refuses a new read up front, and a failed start leaks nothing.
    closed = XtsLayer(FileBackend(tmp_path / "f.img", size=MiB), layer_key(layers))
    transform = closed._cipher.read_transform()
    closed.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="closed"):
            queue.submit("s", bytearray(S), fd, 0, transform, 0)
    finally:
        os.close(fd)
    assert queue.in_flight == 0


def test_the_chained_transform_refuses_what_is_not_two_engines():
    from nbdserver.crypto import _xts
    one = _xts.Engine(bytes(generate_dek()), S)
    other = _xts.Engine(bytes(generate_dek()), 512)
    try:
        with pytest.raises(TypeError):
            _xts.chain_read_transform(one, object())
        with pytest.raises(ValueError, match="data units differ"):
            _xts.chain_read_transform(one, other)
    finally:
        one.close()
        other.close()


# --- the ring's own cases, and the choice between the queues (nbdserver/readqueue.py)

def test_the_ring_reads_the_rest_of_a_short_read(data_file):
    """A completion with fewer bytes than asked is resubmitted for the rest, and 0 bytes
    (the end) leaves zeros, as the thread queue's preadv loop does. A pipe makes the
    kernel's short reads happen on demand (preadv refuses a pipe: ESPIPE)."""
    if ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    q = make_queue("uring", 4)
    r, w = os.pipe()
    try:
        buf = bytearray(b"\xaa") * 300
        os.write(w, b"a" * 100)
        q.submit("p", buf, r, 0)

        def first_part_read() -> bool:
            assert q.collect() == []  # short: not done, read again for the rest
            return buf[:100] == b"a" * 100

        wait_until(first_part_read, what="the first part read")
        assert q.in_flight == 1
        os.write(w, b"b" * 150)
        os.close(w)
        w = -1
        assert collect_all(q, 1) == {"p": 300}
        assert buf == b"a" * 100 + b"b" * 150 + bytes(50)
    finally:
        q.close()
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.fixture
def fresh_choice(monkeypatch):
    """readqueue decides once per process: forget that decision for this test."""
    monkeypatch.setattr(readqueue, "_chosen", None)
    return monkeypatch


@pytest.mark.parametrize("setting, expect", [("threads", ReadQueue), ("uring", "ring"),
                                             ("auto", "ring"), ("bogus", "ring")])
def test_the_environment_picks_the_queue(fresh_choice, caplog, setting, expect):
    if expect == "ring":
        if ring_error() is not None:
            pytest.skip(f"io_uring is not available here: {ring_error()}")
        from nbdserver._uring import RingQueue
        expect = RingQueue
    fresh_choice.setenv(readqueue.ENV, setting)
    with caplog.at_level("INFO", logger="nbdserver.readqueue"):
        queues = [readqueue.make_read_queue(8) for _ in range(3)]
    for q in queues:
        assert type(q) is expect
        q.close()
    said = [r.getMessage() for r in caplog.records]
    if setting == "bogus":
        assert "'bogus' is none of auto, uring, threads" in said.pop(0)
    assert len(said) == 1, said  # the choice, once
    assert ("io_uring" if expect is not ReadQueue else "thread read queue") in said[0]


FALLBACK = """
import logging, os, resource, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from nbdserver import readqueue
from nbdserver._uring import RingQueue
# Leave exactly one free descriptor: io_uring_setup takes it, the ring's eventfd then
# has none (EMFILE), and the thread queue's eventfd gets it back.
lowest_free = os.dup(0)  # dup takes the lowest free descriptor
os.close(lowest_free)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
q = readqueue.make_read_queue(8)
print("made", type(q).__name__)
"""


def test_without_a_ring_the_thread_queue_serves():
    """When the process cannot make a ring, the thread queue serves, and the log says
    why once. What refuses the ring here is the descriptor limit (a seccomp filter would
    need a library this project does not have): io_uring_setup's descriptor fits, the
    ring's eventfd does not."""
    import subprocess
    import sys
    if ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    env = dict(os.environ, **{readqueue.ENV: "auto"})
    out = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    assert out[-1] == "made ReadQueue", out
    assert any("thread read queue: io_uring is not available" in line and "Too many open files"
               in line for line in out), out


def test_a_deferred_ring_submits_at_flush(data_file):
    """With `defer` (the loop's call_soon), submit() only queues: nothing reaches the
    kernel, and nothing completes, until the flush it scheduled (once) runs."""
    if ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    from nbdserver._uring import RingQueue
    path, data = data_file
    scheduled = []
    q = RingQueue(8, scheduled.append)
    fd = os.open(path, os.O_RDONLY)
    try:
        bufs = [bytearray(S) for _ in range(4)]
        for i, buf in enumerate(bufs):
            q.submit(i, buf, fd, i * S)
        assert len(scheduled) == 1  # one flush for the batch
        assert select.select([q.fileno()], [], [], 0.2)[0] == []  # not entered yet
        scheduled.pop()()
        assert collect_all(q, 4) == {i: S for i in range(4)}
        assert bufs == [data[i * S:(i + 1) * S] for i in range(4)]
        q.submit("next", bytearray(S), fd, 0)
        assert len(scheduled) == 1  # the next batch schedules its own
    finally:
        q.close()
        os.close(fd)
