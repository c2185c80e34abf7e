"""Platform disks on Ceph RBD (`nbdserver serve --storage rbd:POOL`): both daemons as real
processes, libnbd as the client, the images read apart from the server through librbd.

- A disk is an image holding ciphertext only.
- A snapshot, and an image, is a copy-on-write clone (instant); a disk made from one is
  re-encrypted under its own DEK, so it is a full image of its own, not a clone.
- Deleting a disk keeps its snapshots (flattened first); deleting everything leaves no
  image of ours in the pool.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.helpers.ceph import CephCluster
from tests.helpers.platform import CliFailed, Stack
from tests.helpers.servers import wait_until

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20


def ceph_args(cluster: CephCluster) -> list[str]:
    return ["--ceph-conf", str(cluster.conf), "--ceph-id", cluster.client_id,
            "--ceph-keyring", str(cluster.keyring)]


@pytest.fixture(scope="module")
def rbd_stack(ceph_cluster, tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("rbdplatform"),
              nbd_args=["--storage", f"rbd:{ceph_cluster.pool}", "--idle-close-seconds", "0",
                        *ceph_args(ceph_cluster)]).start()
    yield s
    try:
        assert "Traceback" not in s.logs(), s.logs()[-6000:]
    finally:
        s.close()


def image_of(disk: dict) -> str:
    pool, _, image = disk["file"].removeprefix("rbd:").partition("/")
    return image


def rbd_info(cluster: CephCluster, image: str) -> dict:
    return json.loads(cluster.rbd("info", "--format", "json", f"{cluster.pool}/{image}"))


def our_images(cluster: CephCluster) -> list[str]:
    names = json.loads(cluster.rbd("ls", "--format", "json", cluster.pool))
    return [n for n in names if n.startswith("nbdserver.")]


def write(stack: Stack, disk: str, offset: int, data: bytes) -> None:
    h = stack.connect(disk)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def read(stack: Stack, disk: str, offset: int, length: int) -> bytes:
    h = stack.connect(disk)
    try:
        return h.pread(length, offset)
    finally:
        h.shutdown()


def test_a_disk_is_an_rbd_image_of_ciphertext(rbd_stack, ceph_cluster):
    nb = rbd_stack.nbdserver
    disk = nb("disk", "create", "r1", "--size", "16M", "--quiet")
    assert disk["storage"] == f"rbd:{ceph_cluster.pool}" and disk["file"].startswith("rbd:")
    image = image_of(disk)
    assert rbd_info(ceph_cluster, image)["size"] == 16 * MiB
    data = os.urandom(MiB)
    write(rbd_stack, "r1", 3 * MiB, data)
    assert read(rbd_stack, "r1", 3 * MiB, MiB) == data
    stored = ceph_cluster.read_image(image, 3 * MiB, MiB)
    assert stored != data and any(stored), "Ceph must hold the ciphertext, never the plaintext"
    assert data[:4096] not in stored
    # A cache mode is for files; a disk may still be put in a file on this server.
    with pytest.raises(CliFailed, match="cache mode is for disks in files"):
        nb("disk", "create", "r1c", "--size", "16M", "--cache", "none", "--quiet")
    local = nb("disk", "create", "r1f", "--size", "16M", "--storage", "file", "--quiet")
    assert local["storage"] == "file" and not local["file"].startswith("rbd:")
    with pytest.raises(CliFailed, match="storage is written"):
        nb("disk", "create", "r1x", "--size", "16M", "--storage", "rbd:", "--quiet")
    # Grown online, attached: the image first, then every new connection sees the size.
    attached = rbd_stack.connect("r1")
    nb("disk", "resize", "r1", "--size", "32M")
    assert rbd_info(ceph_cluster, image)["size"] == 32 * MiB
    assert attached.get_size() == 16 * MiB  # NBD tells a size once
    h = rbd_stack.connect("r1")
    assert h.get_size() == 32 * MiB and h.pread(MiB, 3 * MiB) == data
    h.pwrite(data, 31 * MiB)
    assert h.pread(MiB, 31 * MiB) == data
    h.shutdown()
    attached.shutdown()
    nb("disk", "delete", "r1")
    nb("disk", "delete", "r1f")
    wait_until(lambda: image not in our_images(ceph_cluster), 30, what="the disk's image removed")


def test_snapshots_and_images_are_clones_disks_from_them_are_not(rbd_stack, ceph_cluster):
    nb = rbd_stack.nbdserver
    image = image_of(nb("disk", "create", "r2", "--size", "16M", "--quiet"))
    before = os.urandom(64 << 10)
    attached = rbd_stack.connect("r2")  # served (its image's lock held) while snapshotted
    attached.pwrite(before, 0)
    nb("snapshot", "create", "r2s", "--disk", "r2", "--quiet")
    snap_image, = (n for n in our_images(ceph_cluster) if ".snapshot." in n)
    assert rbd_info(ceph_cluster, snap_image)["parent"]["image"] == image  # copy-on-write
    nb("image", "create", "r2i", "--source", "snapshot:r2s", "--quiet")
    img_image, = (n for n in our_images(ceph_cluster) if ".image." in n)
    assert rbd_info(ceph_cluster, img_image)["parent"]["image"] == snap_image
    attached.pwrite(os.urandom(64 << 10), 0)  # after the snapshot: not in it
    attached.flush()
    attached.shutdown()

    # The disk itself goes; its snapshot keeps the data (flattened) and serves disks.
    nb("disk", "delete", "r2")
    wait_until(lambda: image not in our_images(ceph_cluster), 30, what="the disk's image removed")
    assert "parent" not in rbd_info(ceph_cluster, snap_image)
    for source in ("snapshot:r2s", "image:r2i"):
        made = nb("disk", "create", "r2d", "--source", source, "--quiet")
        made_image = image_of(made)
        assert "parent" not in rbd_info(ceph_cluster, made_image), "a fresh DEK: not a clone"
        assert read(rbd_stack, "r2d", 0, len(before)) == before
        # Its own DEK: the same plaintext is other ciphertext than the snapshot's.
        assert ceph_cluster.read_image(made_image, 0, 4096) != ceph_cluster.read_image(snap_image, 0, 4096)
        nb("disk", "delete", "r2d")
        wait_until(lambda: made_image not in our_images(ceph_cluster), 30, what="r2d removed")

    nb("snapshot", "delete", "r2s")
    nb("image", "delete", "r2i")
    wait_until(lambda: our_images(ceph_cluster) == [], 30, what="no image of ours left")


def test_a_restart_removes_its_own_stray_images_only(rbd_stack, ceph_cluster):
    """A crash between a delete's commit and the image's removal leaves an image no
    volume names: the next start removes it. Another platform's images in the same pool
    (another owner in the name) are left alone, and so are the disks that serve."""
    nb, pool = rbd_stack.nbdserver, ceph_cluster.pool
    image = image_of(nb("disk", "create", "r3", "--size", "16M", "--quiet"))
    owner = image.split(".")[1]
    data = os.urandom(64 << 10)
    write(rbd_stack, "r3", 0, data)
    stray, foreign = f"nbdserver.{owner}.disk.{'0' * 32}", "nbdserver.0ther0wner00.disk.x"
    for name in (stray, foreign):
        ceph_cluster.rbd("create", "--size", "4M", f"{pool}/{name}")
    rbd_stack.restart_nbdserver(same_ports=True)
    left = our_images(ceph_cluster)
    assert stray not in left and foreign in left and image in left
    assert read(rbd_stack, "r3", 0, len(data)) == data
    ceph_cluster.rbd("rm", "--no-progress", f"{pool}/{foreign}")
    nb("disk", "delete", "r3")
    wait_until(lambda: our_images(ceph_cluster) == [], 30, what="no image of ours left")


def test_the_platform_and_another_server_take_turns_and_take_over(rbd_stack, ceph_cluster,
                                                                   server_factory):
    """One image, the platform and a baseline runner (raw, no key) pointed at it: whoever
    holds the image's lock serves, the other refuses; when the baseline runner is killed
    -9 while holding it, the platform's next attach breaks the lock and serves."""
    nb, pool = rbd_stack.nbdserver, ceph_cluster.pool
    image = image_of(nb("disk", "create", "r4", "--size", "16M", "--quiet"))
    data = os.urandom(64 << 10)
    held = rbd_stack.connect("r4")
    held.pwrite(data, 0)
    held.flush()
    other = server_factory([f"raw=rbd:{pool}/{image}"], extra_args=ceph_args(ceph_cluster))
    raw = nbd_connect(other.uri("raw"))
    with pytest.raises(nbd.Error):  # the platform holds the image
        raw.pread(4096, 0)
    held.shutdown()  # idle close at once (--idle-close-seconds 0): the lock is let go
    wait_until(lambda: serves(raw), 30, interval=0.2, what="the other server taking the free lock")
    with pytest.raises(nbd.Error):  # the other server holds it: the attach is refused
        rbd_stack.connect("r4")
    other.kill()
    killed = time.monotonic()
    h = wait_until(lambda: attach(rbd_stack, "r4"), 90, interval=0.5, what="the platform taking over")
    print(f"platform takeover: {time.monotonic() - killed:.1f} s from kill -9 to an attach")
    assert h.pread(len(data), 0) == data
    h.shutdown()
    nb("disk", "delete", "r4")
    wait_until(lambda: image not in our_images(ceph_cluster), 30, what="r4 removed")


def nbd_connect(uri: str):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def serves(h) -> bool:
    try:
        h.pread(4096, 0)
        return True
    except nbd.Error:
        return False


def attach(stack: Stack, disk: str):
    try:
        return stack.connect(disk)
    except nbd.Error:
        return None
