"""The page-cache fast path (nbdserver/cachedio.py over _cachedio.c): READs and small
WRITEs at the head of a received chunk answered in one native call, exactly as the
server's usual path would answer them, and everything else declined, untouched."""

from __future__ import annotations

import os
import threading

import pytest

from nbdserver import cachedio
from nbdserver._cachedio import answer as native_answer
from nbdserver.backend import FileBackend
from nbdserver.crypto import SECTOR_SIZE as S
from nbdserver.crypto import XtsLayer
from nbdserver.protocol.constants import (
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_REQUEST_MAGIC,
)
from nbdserver.protocol.transmission import REQUEST, read_reply_head, simple_reply
from nbdserver.server import INLINE_READ_MAX
from tests.helpers.images import dmcrypt_sector, drop_cache
from tests.unit.test_readq import layer_key

SIZE = 256 * S
STRIPE = 16 * S  # crypto/sector_locks.py SECTORS_PER_STRIPE


def req(cmd: int, offset: int, length: int, cookie: int = 7, flags: int = 0,
        payload: bytes | None = None) -> bytes:
    head = REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    return head + (payload or b"")


def answer(data, backend, **kw):
    args = dict(size=SIZE, min_block=1, structured=False, read_only=False, max_requests=1000,
                max_read=INLINE_READ_MAX)
    args.update(kw)
    return cachedio.answer(data, backend, **args)


@pytest.fixture(params=["single", "double"])
def layer(request, tmp_path):
    layer = XtsLayer(FileBackend(tmp_path / "disk.img", size=SIZE), layer_key(request.param))
    yield layer
    layer.close()


@pytest.fixture
def single(tmp_path):
    key = layer_key("single")
    keep = bytes(key)
    layer = XtsLayer(FileBackend(tmp_path / "disk.img", size=SIZE), key)
    yield layer, keep, tmp_path / "disk.img"
    layer.close()


@pytest.mark.parametrize("structured", [False, True])
def test_cached_reads_get_the_replies_the_usual_path_sends(layer, structured):
    data = os.urandom(8 * S)
    layer.pwrite(memoryview(bytearray(data)), 4 * S)  # sectors 4..11; the rest holes
    chunk = (req(NBD_CMD_READ, 4 * S, 8 * S, cookie=1) + req(NBD_CMD_READ, 0, 2 * S, cookie=2)
             + req(NBD_CMD_READ, 10 * S, 4 * S, cookie=3))
    done = answer(chunk, layer, structured=structured)
    assert done.consumed == len(chunk)
    assert (done.reads, done.read_bytes, done.writes, done.write_bytes) == (3, 14 * S, 0, 0)
    want = b"".join(read_reply_head(c, off, n, structured=structured) + expect
                    for c, off, n, expect in [(1, 4 * S, 8 * S, data), (2, 0, 2 * S, bytes(2 * S)),
                                              (3, 10 * S, 4 * S, data[6 * S:] + bytes(2 * S))])
    assert done.replies == want


def test_cached_writes_land_as_dmcrypt_and_read_back_in_the_same_chunk(single):
    layer, key, path = single
    a, b = os.urandom(S), os.urandom(4 * S)
    chunk = (req(NBD_CMD_WRITE, 3 * S, S, cookie=1, payload=a)
             + req(NBD_CMD_WRITE, 32 * S, 4 * S, cookie=2, payload=b)
             + req(NBD_CMD_READ, 3 * S, S, cookie=3))
    layer._locks.stripe(0)  # the stripe locks are made on first use (by the usual path)
    layer._locks.stripe(2)
    done = answer(chunk, layer)
    assert done.consumed == len(chunk)
    assert (done.reads, done.writes, done.write_bytes) == (1, 2, 5 * S)
    assert done.replies == simple_reply(1) + simple_reply(2) + simple_reply(3) + a
    stored = path.read_bytes()
    assert stored[3 * S:4 * S] == dmcrypt_sector(key, 3, a)
    for i in range(4):
        assert stored[(32 + i) * S:(33 + i) * S] == dmcrypt_sector(key, 32 + i, b[i * S:(i + 1) * S])
    back = bytearray(4 * S)
    layer.pread(memoryview(back), 32 * S)
    assert back == b


def test_the_prefix_stops_at_the_first_request_it_cannot_answer(single):
    layer, _, _ = single
    layer._locks.stripe(0)
    ok = req(NBD_CMD_READ, 0, S, cookie=1)
    declined = [
        req(NBD_CMD_FLUSH, 0, 0),                                    # another command
        req(NBD_CMD_READ, 0, S, flags=NBD_CMD_FLAG_FUA),             # flags
        req(NBD_CMD_READ, 512, S),                                   # not whole sectors
        req(NBD_CMD_READ, 0, S + 512),
        req(NBD_CMD_READ, SIZE - S, 2 * S),                          # past the end
        req(NBD_CMD_READ, 0, 0),                                     # empty
        req(NBD_CMD_READ, 0, INLINE_READ_MAX + S),                 # too large
        req(NBD_CMD_WRITE, 0, S, flags=NBD_CMD_FLAG_FUA, payload=bytes(S)),
        req(NBD_CMD_WRITE, 15 * S, 2 * S, payload=bytes(2 * S)),     # two stripes
        req(NBD_CMD_WRITE, 0, 32 * S, payload=bytes(32 * S)),        # over MAX_WRITE
        b"\x00" * 28,                                                # bad magic
    ]
    # Last in the chunk: a WRITE whose payload has not all arrived, a partial header.
    last = [req(NBD_CMD_WRITE, 0, S, payload=bytes(S - 1)), ok[:27]]
    for chunk in [ok + tail + ok for tail in declined] + [ok + tail for tail in last]:
        done = answer(chunk, layer)
        assert done.consumed == len(ok) and done.reads == 1, chunk[28:56].hex()
        assert done.replies == simple_reply(1) + bytes(S)
    # Nothing at all: no reply, nothing consumed.
    assert answer(req(NBD_CMD_FLUSH, 0, 0), layer) == (0, b"", 0, 0, 0, 0, -1, 0)


def test_the_limits_of_one_call(single):
    layer, _, _ = single
    chunk = b"".join(req(NBD_CMD_READ, i * S, S, cookie=i) for i in range(10))
    assert answer(chunk, layer, max_requests=3).reads == 3
    assert answer(chunk, layer, max_requests=0).consumed == 0
    done = answer(chunk, layer, max_bytes=4 * S + 1)
    assert (done.reads, done.consumed) == (4, 4 * 28)
    # A client that agreed to 8 KiB blocks: a 4 KiB request is the usual path's (EINVAL).
    assert answer(req(NBD_CMD_READ, S, S), layer, min_block=2 * S).consumed == 0
    # Told a smaller size than the file's: the range is the client's.
    assert answer(req(NBD_CMD_READ, 8 * S, S), layer, size=8 * S).consumed == 0


def test_a_read_the_page_cache_does_not_hold_is_left_to_the_usual_path(single):
    layer, _, path = single
    layer.pwrite(memoryview(bytearray(os.urandom(64 * S))), 0)
    layer.flush()
    drop_cache(path)
    chunk = req(NBD_CMD_READ, 8 * S, S, cookie=1)
    done = answer(chunk, layer)
    assert (done.consumed, done.missed) == (0, 1)  # RWF_NOWAIT: EAGAIN, nothing sent
    warm = bytearray(S)
    layer.pread(memoryview(warm), 8 * S)  # the usual path reads it (and caches it)
    done = answer(chunk, layer)
    assert done.replies == simple_reply(1) + warm and not done.missed
    # Without `reads` (a connection on cold data stops trying) no READ is even tried.
    assert answer(chunk, layer, reads=False).consumed == 0


def test_a_busy_or_unmade_stripe_lock_leaves_the_write_to_the_usual_path(single):
    layer, _, path = single
    chunk = req(NBD_CMD_WRITE, 16 * S, S, cookie=1, payload=os.urandom(S))
    assert answer(chunk, layer).consumed == 0  # stripe 1's lock is not made yet
    lock = layer._locks.stripe(1)
    with lock:  # another thread's RMW of that stripe, say
        assert answer(chunk, layer).consumed == 0
        assert path.read_bytes()[16 * S:17 * S] == bytes(S)  # untouched
    assert answer(chunk, layer).writes == 1
    assert not lock.locked()
    # Waiting for the lock would stall the event loop: taken without waiting, so a
    # holder in another thread makes the call return at once.
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        assert answer(chunk, layer).consumed == 0
    finally:
        release.set()
        t.join()


def test_writes_are_refused_to_a_read_only_client(tmp_path):
    single = XtsLayer(FileBackend(tmp_path / "s.img", size=SIZE), layer_key("single"))
    try:
        single._locks.stripe(0)
        chunk = req(NBD_CMD_WRITE, 0, S, payload=os.urandom(S))
        assert answer(chunk, single, read_only=True).consumed == 0
        assert answer(chunk, single).writes == 1
    finally:
        single.close()


def test_a_double_disk_writes_both_layers_in_one_transform(tmp_path):
    """Two layers (double.py): the inner (platform) key's encryption, then the outer
    (customer) key's, each sector tweaked by its number, as the usual path writes."""
    key = layer_key("double")
    inner, outer = bytes(key[:64]), bytes(key[64:])
    path = tmp_path / "d.img"
    double = XtsLayer(FileBackend(path, size=SIZE), key)
    try:
        double._locks.stripe(0)
        a = os.urandom(3 * S)
        chunk = req(NBD_CMD_WRITE, 2 * S, 3 * S, cookie=1, payload=a) + req(NBD_CMD_READ, 2 * S, 3 * S, cookie=2)
        done = answer(chunk, double)
        assert (done.consumed, done.writes, done.reads) == (len(chunk), 1, 1)
        assert done.replies == simple_reply(1) + simple_reply(2) + a
        stored = path.read_bytes()
        for i in range(3):
            plain = a[i * S:(i + 1) * S]
            assert stored[(2 + i) * S:(3 + i) * S] == dmcrypt_sector(
                outer, 2 + i, dmcrypt_sector(inner, 2 + i, plain))
        double._cipher.close()  # a closed engine: declined, as for one layer
        assert answer(chunk, double) is None or answer(chunk, double).consumed == 0
    finally:
        double.close()


def test_a_plain_file_is_served_without_a_transform(tmp_path):
    path = tmp_path / "plain.img"
    backend = FileBackend(path, size=SIZE)
    try:
        data = os.urandom(2 * S)
        chunk = (req(NBD_CMD_WRITE, 512, len(data), cookie=1, payload=data)  # any alignment
                 + req(NBD_CMD_READ, 512, len(data), cookie=2))
        done = answer(chunk, backend)
        assert (done.writes, done.reads) == (1, 1)
        assert done.replies == simple_reply(1) + simple_reply(2) + data
        assert path.read_bytes()[512:512 + len(data)] == data
    finally:
        backend.close()


def test_closed_backends_and_subclasses_offer_nothing(tmp_path):
    class FakeCold(FileBackend):  # a subclass that changes pread alone
        def pread(self, buf, offset, *, nowait=False):
            if nowait:
                raise BlockingIOError
            super().pread(buf, offset)

    fake = FakeCold(tmp_path / "f.img", size=SIZE)
    assert fake.page_cache_reads() is None
    assert fake.page_cache_writes() is not None  # pwrite is FileBackend's own
    fake.close()
    assert fake.page_cache_writes() is None
    layer = XtsLayer(FileBackend(tmp_path / "x.img", size=SIZE), layer_key("single"))
    layer.close()
    assert layer.page_cache_reads() is None and layer.page_cache_writes() is None
    direct = FileBackend(tmp_path / "o.img", size=SIZE, cache="none")
    try:
        assert direct.page_cache_reads() is None and direct.page_cache_writes() is None
    finally:
        direct.close()


def test_bad_arguments_raise_and_a_closed_engine_declines(single):
    layer, _, _ = single
    fd, transform, unit = layer.page_cache_reads()
    wfd, wtransform, _, locks, per = layer.page_cache_writes()
    chunk = req(NBD_CMD_READ, 0, S)
    base = [chunk, SIZE, unit, unit, False, 1 << 20, 10, 1 << 17, fd, transform,
            1 << 16, wfd, wtransform, locks, per, -1]
    assert native_answer(*base)[2] == 1
    for i, bad in [(2, 0), (3, S // 2), (6, -1), (9, object()), (13, "locks")]:
        args = list(base)
        args[i] = bad
        with pytest.raises((ValueError, TypeError)):
            native_answer(*args)
    # A write transform where a read transform belongs, or the reverse, is refused:
    # run, it would encrypt what is read, or decrypt what is written.
    for i, other in [(9, wtransform), (12, transform)]:
        args = list(base)
        args[i] = other
        with pytest.raises(ValueError):
            native_answer(*args)
    layer.close()  # the engine's contexts are gone; the capsules keep the objects only
    assert native_answer(*base)[:3] == (0, b"", 0)  # declined: the usual path reports it
    layer._locks.stripe(0)
    write = req(NBD_CMD_WRITE, 0, S, payload=bytes(S))
    assert native_answer(write, *base[1:])[:3] == (0, b"", 0)


def test_the_sampled_request_is_named_by_its_command(single):
    layer, _, _ = single
    layer._locks.stripe(0)
    chunk = (req(NBD_CMD_READ, 0, S) + req(NBD_CMD_WRITE, S, S, payload=bytes(S))
             + req(NBD_CMD_READ, 0, S))
    assert [answer(chunk, layer, sample=i).sampled for i in range(4)] == [
        NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_READ, -1]
    assert answer(chunk, layer).sampled == -1


# --- against a model: any stream of requests, well-formed or not -----------------------

def model_answer(stream: bytes, twin, *, stripes: bool, size: int = SIZE, max_bytes: int = 1 << 20):
    """What the native call must do, by the rules in Python and the usual path's own
    layer calls on a twin disk: (consumed, replies)."""
    pos, out, read_bytes = 0, [], 0
    unit = S if stripes else 1
    while len(stream) - pos >= 28:
        magic, flags, cmd, cookie, off, n = REQUEST.unpack_from(stream, pos)
        if (magic != NBD_REQUEST_MAGIC or flags or not n or (off | n) % unit or off > size
                or n > size - off):
            break
        if cmd == NBD_CMD_READ and n <= INLINE_READ_MAX and read_bytes + n <= max_bytes:
            buf = bytearray(n)
            twin.pread(memoryview(buf), off)
            out.append(simple_reply(cookie) + bytes(buf))
            read_bytes += n
            pos += 28
        elif (cmd == NBD_CMD_WRITE and n <= cachedio.MAX_WRITE and len(stream) - pos - 28 >= n
              and (not stripes or off // STRIPE == (off + n - 1) // STRIPE)):
            twin.pwrite(memoryview(bytearray(stream[pos + 28:pos + 28 + n])), off)
            out.append(simple_reply(cookie))
            pos += 28 + n
        else:
            break
    return pos, b"".join(out)


def request_stream(rng, unit: int) -> bytes:
    out = []
    for cookie in range(rng.randint(1, 6)):
        cmd = rng.choice([NBD_CMD_READ, NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_WRITE, NBD_CMD_FLUSH])
        n = rng.choice([1, 1, 2, 4, 16, 17, 32]) * unit + rng.choice([0] * 12 + [1, 511])
        off = rng.randrange(0, SIZE // unit) * unit + rng.choice([0] * 12 + [512])
        flags = rng.choice([0] * 8 + [NBD_CMD_FLAG_FUA])
        out.append(req(cmd, off, n, cookie=cookie, flags=flags,
                       payload=os.urandom(n) if cmd == NBD_CMD_WRITE else None))
    data = bytearray(b"".join(out))
    for _ in range(rng.choice([0, 0, 1, 3])):  # a few mutations: lengths, magics, cuts
        if not data:
            break
        at = rng.randrange(len(data))
        how = rng.randrange(3)
        if how == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif how == 1:
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00" * 4])
        else:
            del data[at:]
    return bytes(data)


@pytest.mark.parametrize("kind", ["xts", "plain"])
def test_any_stream_is_answered_as_the_model_says(tmp_path, kind):
    import random

    rng = random.Random(20261206)
    if kind == "xts":
        key = layer_key("single")
        disks = [XtsLayer(FileBackend(tmp_path / f"{i}.img", size=SIZE), bytearray(key))
                 for i in range(2)]
        for d in disks:
            for i in range(SIZE // STRIPE):
                d._locks.stripe(i % 1024)
    else:
        disks = [FileBackend(tmp_path / f"{i}.img", size=SIZE) for i in range(2)]
    native, twin = disks
    try:
        for _ in range(1000):
            stream = request_stream(rng, S if kind == "xts" else 512)
            done = answer(stream, native)
            want = model_answer(stream, twin, stripes=kind == "xts")
            assert (done.consumed, done.replies) == want
        assert (tmp_path / "0.img").read_bytes() == (tmp_path / "1.img").read_bytes()
    finally:
        for d in disks:
            d.close()
