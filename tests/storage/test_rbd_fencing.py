"""Fencing of RBD disks: two server processes pointed at the same image, one serves.

The baseline runner opens its exports at start, so the second server opens the image
in standby (rbdbackend.py, "Fencing"). Its requests fail with EIO while the first holds
the image's exclusive lock, and Ceph's bytes do not change; once the first is killed -9,
the second's next request breaks the lock (librbd blocklists the dead holder) and
serves, with every write the first acknowledged intact. A server whose lock is taken
away while it lives (blocklisted) never writes again through that open.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.helpers.ceph import CephCluster
from tests.helpers.servers import wait_until

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

pytestmark = pytest.mark.timeout(240)
KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
# librbd finds a killed holder gone once its watch lapses (`osd client watch timeout`,
# 10 s on the test cluster); each standby request that tries the lock may take seconds.
TAKEOVER_DEADLINE = 90.0


def ceph_args(cluster: CephCluster) -> list[str]:
    return ["--ceph-conf", str(cluster.conf), "--ceph-id", cluster.client_id,
            "--ceph-keyring", str(cluster.keyring)]


@pytest.fixture
def two_servers(ceph_cluster, rbd_image, server_factory, tmp_path):
    keyfile = tmp_path / "dek.key"
    keyfile.write_bytes(os.urandom(64))
    keyfile.chmod(0o600)
    image = rbd_image(SIZE)
    export = [f"enc=rbd:{ceph_cluster.pool}/{image},key={keyfile}"]
    first = server_factory(export, extra_args=ceph_args(ceph_cluster))
    second = server_factory(export, extra_args=ceph_args(ceph_cluster))
    return first, second, image


def connect(srv):
    h = nbd.NBD()
    h.connect_uri(srv.uri("enc"))
    return h


def fails_with_eio(call) -> bool:
    try:
        call()
    except nbd.Error as e:
        assert e.errno == "EIO", e
        return True
    return False


def serves(h) -> bool:
    try:
        h.pread(4 * KiB, 0)
        return True
    except nbd.Error as e:
        assert e.errno == "EIO", e
        return False


def lock_owner(cluster: CephCluster, image: str) -> str:
    """The address of the client that holds the image's exclusive lock."""
    locks = json.loads(cluster.rbd("lock", "ls", "--format", "json", f"{cluster.pool}/{image}"))
    return locks[0]["address"] if isinstance(locks, list) else next(iter(locks.values()))["address"]


def blocklisted(cluster: CephCluster) -> set[str]:
    out = cluster.ceph("osd", "blocklist", "ls", "--format", "json").strip()
    entries, _ = json.JSONDecoder().raw_decode(out)  # the command prints a second, empty list
    return {e["addr"] for e in entries}


def acknowledged_writes(h) -> dict[int, bytes]:
    """Writes in flight together, each answered, then a flush: all promised durable."""
    data = {i * MiB + (i % 4) * 4 * KiB: os.urandom((4 << (i % 5)) * KiB) for i in range(12)}
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off) for off, d in data.items()]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    h.flush()
    return data


def test_the_second_server_cannot_write_until_the_first_is_killed(two_servers, ceph_cluster):
    first, second, image = two_servers
    ha = connect(first)
    written = acknowledged_writes(ha)

    hb = connect(second)
    stored = ceph_cluster.read_image(image, 0, 2 * MiB)
    assert fails_with_eio(lambda: hb.pwrite(os.urandom(64 * KiB), 0)), "the second server wrote"
    assert fails_with_eio(lambda: hb.pread(4 * KiB, 0))
    assert ceph_cluster.read_image(image, 0, 2 * MiB) == stored
    assert ha.pread(4 * KiB, 0) == written[0][:4 * KiB]  # the first still serves
    owner = lock_owner(ceph_cluster, image)

    first.kill()  # SIGKILL: no unlock, no flush, its watch lapses on the OSD
    killed = time.monotonic()
    wait_until(lambda: serves(hb), TAKEOVER_DEADLINE, interval=0.2, what="the second server serving")
    print(f"takeover: {time.monotonic() - killed:.1f} s from kill -9 to the first served read")

    fresh = connect(second)  # a client that reconnects finds every acknowledged write
    for off, d in written.items():
        assert fresh.pread(len(d), off) == d, f"acknowledged write at {off} lost"
    new = os.urandom(64 * KiB)
    fresh.pwrite(new, 8 * MiB)
    fresh.flush()
    assert fresh.pread(len(new), 8 * MiB) == new
    assert owner in blocklisted(ceph_cluster), "the dead holder was not blocklisted"
    fresh.shutdown()
    hb.shutdown()


def test_a_server_whose_lock_is_taken_never_writes_again(two_servers, ceph_cluster):
    first, second, image = two_servers
    ha = connect(first)
    written = acknowledged_writes(ha)
    owner = lock_owner(ceph_cluster, image)  # the first server's client
    ceph_cluster.ceph("osd", "blocklist", "add", owner)

    stored = ceph_cluster.read_image(image, 0, 2 * MiB)
    wait_until(lambda: fails_with_eio(lambda: ha.pwrite(os.urandom(4 * KiB), 0)), 60, interval=0.2,
               what="the fenced server failing writes")
    ceph_cluster.ceph("osd", "blocklist", "rm", owner)  # even let back in, it stays fenced
    assert fails_with_eio(lambda: ha.pwrite(os.urandom(4 * KiB), 0))
    assert fails_with_eio(lambda: ha.pread(4 * KiB, 0))
    assert ceph_cluster.read_image(image, 0, 2 * MiB) == stored

    hb = connect(second)
    wait_until(lambda: serves(hb), TAKEOVER_DEADLINE, interval=0.2, what="the second server serving")
    for off, d in written.items():
        assert hb.pread(len(d), off) == d
    hb.shutdown()
