"""FileBackend (nbdserver.backend): a sparse file with holes, trim, zero, block status, FUA."""

from __future__ import annotations

import errno
import os

import pytest

from nbdserver.backend import Extent, FileBackend, file_extents

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def disk(tmp_path):
    b = FileBackend(tmp_path / "disk.img", size=SIZE)
    yield b
    b.close()


def read(b, offset, n):
    buf = bytearray(n)
    b.pread(memoryview(buf), offset)
    return bytes(buf)


def allocated(b, offset, length) -> bool:
    """Whether any byte of the range has storage, asked of the file itself."""
    fd = b.fileno()
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
    except OSError as e:
        assert e.errno == errno.ENXIO
        return False


def test_new_file_is_sparse_and_reads_zeros(disk, tmp_path):
    assert disk.size == SIZE == os.path.getsize(tmp_path / "disk.img")
    assert os.stat(tmp_path / "disk.img").st_blocks == 0
    assert os.stat(tmp_path / "disk.img").st_mode & 0o777 == 0o600
    assert read(disk, 0, MiB) == bytes(MiB)
    assert disk.block_status(0, SIZE) == [Extent(SIZE, hole=True, zero=True)]


def test_write_read_and_block_status(disk):
    disk.pwrite(memoryview(b"a" * MiB), 2 * MiB)
    disk.pwrite(memoryview(b"b" * 4096), 5 * MiB, fua=True)
    disk.flush()
    assert read(disk, 2 * MiB, MiB) == b"a" * MiB
    assert read(disk, 5 * MiB - 512, 1024) == bytes(512) + b"b" * 512
    assert disk.block_status(0, SIZE) == [
        Extent(2 * MiB, hole=True, zero=True), Extent(MiB),
        Extent(2 * MiB, hole=True, zero=True), Extent(4096),
        Extent(3 * MiB - 4096, hole=True, zero=True)]
    # A range inside one extent is described from its own start, and never beyond its end.
    assert disk.block_status(2 * MiB + 512, 1024) == [Extent(1024)]
    assert disk.block_status(SIZE - 512, 512) == [Extent(512, hole=True, zero=True)]


def test_trim_punches_a_hole(disk):
    disk.pwrite(memoryview(b"x" * (3 * MiB)), 0)
    disk.trim(MiB, MiB, fua=True)
    assert read(disk, 0, 3 * MiB) == b"x" * MiB + bytes(MiB) + b"x" * MiB
    assert not allocated(disk, MiB, MiB)
    assert disk.block_status(MiB, MiB) == [Extent(MiB, hole=True, zero=True)]


def test_zero_may_trim_or_keep_allocation(disk):
    disk.pwrite(memoryview(b"y" * (4 * MiB)), 0)
    disk.zero(0, MiB)                      # may trim: a hole
    disk.zero(2 * MiB, MiB, may_trim=False, fua=True)  # NO_HOLE: stays allocated
    disk.zero(3 * MiB, MiB, fast=True)     # fast: hole punching is fast
    assert read(disk, 0, 4 * MiB) == bytes(MiB) + b"y" * MiB + bytes(2 * MiB)
    assert not allocated(disk, 0, MiB)
    assert allocated(disk, 2 * MiB, MiB)
    assert not allocated(disk, 3 * MiB, MiB)
    ext = disk.block_status(2 * MiB, MiB)
    assert all(not e.hole for e in ext)    # allocated zeros are data, as far as SEEK_DATA knows


def test_read_only_backend_refuses_writes(tmp_path, disk):
    disk.pwrite(memoryview(b"r" * 4096), 0)
    ro = FileBackend(disk.path, readonly=True)
    try:
        caps = ro.capabilities
        assert not (caps.writable or caps.trim or caps.zero or caps.fua or caps.flush)
        assert read(ro, 0, 4096) == b"r" * 4096
        for op in (lambda: ro.pwrite(memoryview(b"x" * 512), 0), lambda: ro.trim(0, 512),
                   lambda: ro.zero(0, 512)):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EPERM
    finally:
        ro.close()


def test_nowait(disk):
    disk.pwrite(memoryview(b"n" * 4096), 0)
    buf = bytearray(4096)
    try:
        disk.pread(memoryview(buf), 0, nowait=True)  # just written: in the page cache
        assert buf == b"n" * 4096
    except BlockingIOError:
        pass  # a filesystem without RWF_NOWAIT reads: the caller uses a worker
    with pytest.raises(BlockingIOError):
        disk.pwrite(memoryview(b"f" * 512), 0, fua=True, nowait=True)  # FUA always blocks


def test_open_existing_and_resize(tmp_path):
    path = tmp_path / "e.img"
    path.write_bytes(b"z" * 4096)
    b = FileBackend(path)
    assert b.size == 4096 and read(b, 0, 4096) == b"z" * 4096
    b.close()
    b.close()  # idempotent
    b = FileBackend(path, size=MiB)
    assert b.size == MiB and read(b, 4096, 512) == bytes(512)
    b.close()


def test_grow_after_the_file_keeps_the_mapping_and_its_count(tmp_path):
    """An online resize extends the file, then grows the open backend: block status covers
    the new end; a mapping made before keeps its length, and its address space is given
    back as mapped, not as the new size."""
    import nbdserver.backend as backend
    b = FileBackend(tmp_path / "g.img", size=MiB)
    before = backend._mapped_bytes
    assert b.mapping() is not None and backend._mapped_bytes == before + MiB
    with pytest.raises(OSError):
        b.grow(2 * MiB)  # the file first
    os.truncate(b.path, 2 * MiB)
    b.grow(2 * MiB)
    assert b.size == 2 * MiB and len(b.mapping()) == MiB
    assert b.block_status(MiB, MiB) == [Extent(MiB, hole=True, zero=True)]
    with pytest.raises(OSError):
        b.grow(MiB)
    b.close()
    assert backend._mapped_bytes == before


def test_cache_is_advisory(disk):
    disk.cache(0, SIZE)


def test_file_extents_past_the_end_stop_at_size(disk):
    assert file_extents(disk.fileno(), SIZE - 4096, 1 << 30, SIZE) == [Extent(4096, hole=True, zero=True)]
