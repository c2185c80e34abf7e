"""RbdBackend (nbdserver/rbdbackend.py) against a real cluster: every BlockBackend
operation, concurrency on one image, the errors at its boundary, and XtsLayer over it
leaving only dm-crypt ciphertext in the image."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from nbdserver.backend import Extent
from nbdserver.rbdbackend import CONNECTIONS, RbdSpec
from tests.helpers.images import dmcrypt_sector
from tests.helpers.servers import ROOT

rbd = pytest.importorskip("rbd", reason="python3-rbd is not installed")

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20
OBJECT = 4 * MiB  # RBD's default object size


def spec_of(cluster, image: str, **kw) -> RbdSpec:
    return RbdSpec(cluster.pool, image, str(cluster.conf), cluster.client_id, str(cluster.keyring), **kw)


@pytest.fixture
def disk(ceph_cluster, rbd_image):
    backend = spec_of(ceph_cluster, rbd_image(16 * MiB)).open()
    yield backend
    backend.close()


def test_concurrent_writes_read_back_at_any_offset(disk):
    rng = random.Random(1)
    # 30 writes in flight from 8 threads, each in its own slot, of 512 B to 512 KiB, some
    # at offsets that are not sector multiples.
    slot = MiB // 2
    writes = [(i * slot + rng.choice([0, 512, 4096, 1000]), rng.randbytes(rng.choice([512, 4096, 65536, slot - 4096])))
              for i in range(30)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda w: disk.pwrite(memoryview(w[1]), w[0]), writes))
    disk.flush()
    for off, data in writes:
        buf = bytearray(len(data))
        disk.pread(memoryview(buf), off)
        assert buf == data


def test_trim_and_zero_read_back_as_zeros_even_inside_an_object(disk):
    disk.pwrite(memoryview(b"\xff" * (2 * MiB)), MiB)
    disk.trim(MiB + 4096, 8192)               # inside one object: Ceph would skip it by default
    disk.zero(2 * MiB, 4096, may_trim=False)  # NO_HOLE: write_zeroes, kept allocated
    buf = bytearray(2 * MiB)
    disk.pread(memoryview(buf), MiB)
    assert buf[:4096] == b"\xff" * 4096
    assert buf[4096:3 * 4096] == bytes(8192)
    assert buf[3 * 4096:MiB] == b"\xff" * (MiB - 3 * 4096)
    assert buf[MiB:MiB + 4096] == bytes(4096)
    with pytest.raises(OSError) as e:
        disk.zero(0, 4096, fast=True)
    assert e.value.errno == errno.ENOTSUP


def test_block_status_shows_written_objects_as_data_and_the_rest_as_holes(disk):
    assert disk.block_status(0, 16 * MiB) == [Extent(16 * MiB, hole=True, zero=True)]
    disk.pwrite(memoryview(b"x" * 4096), 2 * OBJECT + 100)
    assert disk.block_status(0, 16 * MiB) == [
        Extent(2 * OBJECT, hole=True, zero=True), Extent(OBJECT), Extent(OBJECT, hole=True, zero=True)]
    # A range starting inside the written object is clipped to the range asked for.
    assert disk.block_status(2 * OBJECT + 8192, 8192) == [Extent(8192)]


def test_nowait_is_always_refused_so_the_loop_never_waits_for_the_network(disk):
    with pytest.raises(BlockingIOError):
        disk.pread(memoryview(bytearray(4096)), 0, nowait=True)
    with pytest.raises(BlockingIOError):
        disk.pwrite(memoryview(bytes(4096)), 0, nowait=True)


def test_a_read_only_disk_refuses_writes(ceph_cluster, rbd_image):
    backend = spec_of(ceph_cluster, rbd_image(MiB), readonly=True).open()
    try:
        assert not backend.capabilities.writable
        for call in (lambda: backend.pwrite(memoryview(bytes(512)), 0), lambda: backend.trim(0, 512),
                     lambda: backend.zero(0, 512)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EPERM
    finally:
        backend.close()


def test_size_creates_a_missing_image_and_never_resizes_one(ceph_cluster, rbd_image):
    name = f"made-{os.getpid()}"
    backend = spec_of(ceph_cluster, name, size=3 * MiB).open()
    try:
        assert backend.size == 3 * MiB
    finally:
        backend.close()
    try:
        with pytest.raises(OSError) as e:
            spec_of(ceph_cluster, name, size=4 * MiB).open()
        assert e.value.errno == errno.EINVAL and "never resized" in e.value.strerror
    finally:
        ceph_cluster.rbd("rm", "--no-progress", f"{ceph_cluster.pool}/{name}")


def test_errors_say_what_is_missing(ceph_cluster, tmp_path):
    with pytest.raises(OSError) as e:
        spec_of(ceph_cluster, "no-such-image").open()
    assert e.value.errno == errno.ENOENT and "rbd:rbd/no-such-image" in e.value.strerror
    with pytest.raises(OSError) as e:
        RbdSpec("rbd", "x", str(tmp_path / "absent.conf")).open()
    assert e.value.errno == errno.ENOENT
    # A pool the client has no rights on: a clear error, and the connection is released.
    with pytest.raises(OSError):
        RbdSpec("nopool", "x", str(ceph_cluster.conf), ceph_cluster.client_id, str(ceph_cluster.keyring),
                size=MiB).open()
    assert not CONNECTIONS._open


@pytest.mark.parametrize("text", ["rbd:pool", "rbd:/img", "rbd:pool/", "file:pool/img", "rbd:p/a/b",
                                  "rbd:p/img@snap"])
def test_spec_parse_refuses_what_is_not_pool_slash_image(text):
    with pytest.raises(ValueError, match="rbd:POOL/IMAGE"):
        RbdSpec.parse(text, conf="/x")


def test_images_share_one_connection_released_with_the_last(ceph_cluster, rbd_image):
    a = spec_of(ceph_cluster, rbd_image(MiB)).open()
    b = spec_of(ceph_cluster, rbd_image(MiB)).open()
    assert len(CONNECTIONS._open) == 1
    a.close()
    a.close()  # idempotent
    assert len(CONNECTIONS._open) == 1
    b.close()
    assert not CONNECTIONS._open


def test_xts_over_rbd_stores_dmcrypt_ciphertext_only(ceph_cluster, rbd_image):
    from nbdserver.crypto import XtsLayer
    key = os.urandom(64)
    name = rbd_image(8 * MiB)
    layer = XtsLayer(spec_of(ceph_cluster, name).open(), bytearray(key))
    plain = os.urandom(64 * 1024)
    try:
        layer.pwrite(memoryview(plain), MiB)
        layer.pwrite(memoryview(b"a" * 100), 3 * MiB + 10)  # unaligned: read-modify-write
        layer.flush()
        out = bytearray(len(plain))
        layer.pread(memoryview(out), MiB)
        assert out == plain
        small = bytearray(100)
        layer.pread(memoryview(small), 3 * MiB + 10)
        assert small == b"a" * 100
    finally:
        layer.close()
    raw = ceph_cluster.read_image(name, MiB, len(plain))
    for i in range(0, len(plain), 4096):
        assert raw[i:i + 4096] == dmcrypt_sector(key, (MiB + i) // 4096, plain[i:i + 4096])


def test_another_process_opens_the_same_image_from_the_spec_as_plain_data(ceph_cluster, rbd_image):
    """What another process does with the spec as JSON: read-only, it sees this
    process's writes; writable, it is refused while this open holds the image's
    exclusive lock (fencing: one writer), and serves once this one closed."""
    spec = spec_of(ceph_cluster, rbd_image(8 * MiB))
    child = (
        "import dataclasses, errno, json, sys\n"
        "from nbdserver.rbdbackend import RbdSpec\n"
        "spec = RbdSpec(**json.loads(sys.argv[1]))\n"
        "r = dataclasses.replace(spec, readonly=True).open()\n"
        "buf = bytearray(4096); r.pread(memoryview(buf), 0); r.close()\n"
        "assert buf == b'p' * 4096, bytes(buf[:8])\n"
        "try:\n"
        "    b = spec.open()\n"
        "except OSError as e:\n"
        "    sys.exit(0 if e.errno == errno.EBUSY else 3)\n"
        "b.pwrite(memoryview(b'c' * 4096), 4096); b.flush(); b.close()\n"
        "sys.exit(1)\n")

    def run_child():
        return subprocess.run([sys.executable, "-c", child, json.dumps(dataclasses.asdict(spec))],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)

    here = spec.open()
    try:
        here.pwrite(memoryview(b"p" * 4096), 0)
        here.flush()
        done = run_child()
        assert done.returncode == 0, f"the writable open was not refused: {done.stderr}"
    finally:
        here.close()
    done = run_child()  # the lock is free: the other process writes
    assert done.returncode == 1, done.stderr
    assert ceph_cluster.read_image(spec.image, 4096, 4096) == b"c" * 4096
