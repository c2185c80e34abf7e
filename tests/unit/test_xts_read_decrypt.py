"""The read side of the engine's one-call I/O (`Engine.read_decrypt`, crypto/_xts.c) and
XtsLayer's short path for the event loop's page-cache reads, which uses it: preadv2 and
decryption in one call, with holes, zeros past the end, and RWF_NOWAIT's answers."""

import errno
import os

import pytest

from nbdserver.backend import FileBackend
from nbdserver.crypto import SECTOR_SIZE as S
from nbdserver.crypto import XtsLayer, generate_dek
from tests.helpers.images import dmcrypt_sector, drop_cache
from tests.unit.test_readq import layer_key

SIZE = 64 * S


@pytest.fixture(params=["single", "double"])
def layer(request, tmp_path):
    layer = XtsLayer(FileBackend(tmp_path / "disk.img", size=SIZE), layer_key(request.param))
    yield layer
    layer.close()


def test_the_engine_reads_and_decrypts_in_one_call(tmp_path):
    key = generate_dek()
    keep = bytes(key)
    path = tmp_path / "disk.img"
    plain = os.urandom(3 * S)
    with open(path, "wb") as f:  # sectors 5..7 written, 0..4 holes, then the end at 8
        f.write(bytes(5 * S))
        for i in range(3):
            f.write(dmcrypt_sector(keep, 5 + i, plain[i * S:(i + 1) * S]))
    layer = XtsLayer(FileBackend(path), key)
    fd = layer.lower.fileno()
    read_decrypt = layer._cipher.read_decrypt
    try:
        buf = bytearray(b"\xee") * (3 * S)
        assert read_decrypt(buf, fd, 5 * S, 5, 0) == 0
        assert buf == plain
        # Two holes, the written sectors, then past the end of the file: zeros, counted
        # as holes like never-written sectors.
        buf = bytearray(b"\xee") * (6 * S)
        assert read_decrypt(buf, fd, 3 * S, 3, 0) == 2 + 1
        assert buf == bytes(2 * S) + plain + bytes(S)
        with pytest.raises(ValueError, match="data units"):
            read_decrypt(bytearray(S + 1), fd, 0, 0, 0)
        with pytest.raises(ValueError, match="bad fd"):
            read_decrypt(bytearray(S), -1, 0, 0, 0)
        with pytest.raises(BufferError):
            read_decrypt(bytes(S), fd, 0, 0, 0)  # not writable
        directory = os.open(tmp_path, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                read_decrypt(bytearray(S), directory, 0, 0, 0)
        finally:
            os.close(directory)
        assert e.value.errno == errno.EISDIR
    finally:
        layer.close()
    with pytest.raises(ValueError, match="closed"):
        read_decrypt(bytearray(S), 0, 0, 0, 0)


def test_a_nowait_read_of_whole_sectors_takes_the_short_path(layer):
    plain = os.urandom(8 * S)
    layer.pwrite(memoryview(plain), 4 * S)
    assert layer._nowait_read_fd == layer.lower.fileno()
    for offset, length in [(4 * S, S), (4 * S, 8 * S), (2 * S, 4 * S), (60 * S, 4 * S)]:
        buf = bytearray(b"\xee") * length
        layer.pread(memoryview(buf), offset, nowait=True)
        model = (bytes(4 * S) + plain + bytes(SIZE))[offset:offset + length]
        assert buf == model, (offset, length)
    # Unaligned reads take the general path, and agree.
    buf = bytearray(1000)
    layer.pread(memoryview(buf), 4 * S + 100, nowait=True)
    assert buf == plain[100:1100]


def test_a_cold_page_is_refused_with_nowait_and_read_without(layer, tmp_path):
    plain = os.urandom(16 * S)
    layer.pwrite(memoryview(plain), 0)
    layer.flush()
    drop_cache(tmp_path / "disk.img")
    buf = bytearray(16 * S)
    try:
        layer.pread(memoryview(buf), 0, nowait=True)
    except BlockingIOError:
        pass  # the page cache had none of it: the caller sends it to the read queue
    else:  # pragma: no cover - the kernel kept the pages (read-ahead from elsewhere)
        assert buf == plain
    layer.pread(memoryview(buf), 0)
    assert buf == plain


def test_a_file_system_without_nowait_reads_turns_the_short_path_off(layer):
    """EOPNOTSUPP (tmpfs, procfs, some FUSE mounts say so for RWF_NOWAIT) is a cache
    miss for the caller, and later reads ask the lower layer instead. A /proc file
    stands in for such a file system: no data file can be made on one here."""
    fd = os.open("/proc/self/stat", os.O_RDONLY)
    try:
        layer._nowait_read_fd = fd
        with pytest.raises(BlockingIOError):
            layer.pread(memoryview(bytearray(S)), 0, nowait=True)
        assert layer._nowait_read_fd is None
    finally:
        os.close(fd)
    layer.pwrite(memoryview(b"x" * S), 0)
    buf = bytearray(S)
    layer.pread(memoryview(buf), 0, nowait=True)  # the general path, through the file
    assert buf == b"x" * S


class FakeCold(FileBackend):
    """Changes pread only (every nowait read is a miss), as tests/unit's cold-read
    doubles do: native_read, defined by FileBackend, no longer speaks for it."""

    def pread(self, buf, offset, *, nowait=False):
        if nowait:
            raise BlockingIOError(errno.EAGAIN, "cold")
        super().pread(buf, offset)


def test_the_short_path_is_open_only_where_native_read_speaks_for_pread(tmp_path):
    path = tmp_path / "d"
    cases = [(FileBackend(path, size=SIZE), True), (FakeCold(path, size=SIZE), False)]
    try:
        cases.append((FileBackend(tmp_path / "direct", size=SIZE, cache="none"), False))
    except OSError:  # pragma: no cover - a file system without O_DIRECT
        pass
    for lower, short in cases:
        layer = XtsLayer(lower, generate_dek())
        try:
            assert layer._nowait_read_fd == (lower.fileno() if short else None), type(lower)
            if isinstance(lower, FakeCold):
                with pytest.raises(BlockingIOError):
                    layer.pread(memoryview(bytearray(S)), 0, nowait=True)
        finally:
            layer.close()


def test_a_closed_layer_refuses_a_nowait_read(layer):
    layer.close()
    with pytest.raises(OSError) as e:
        layer.pread(memoryview(bytearray(S)), 0, nowait=True)
    assert e.value.errno == errno.ESHUTDOWN
