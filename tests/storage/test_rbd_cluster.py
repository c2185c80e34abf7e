"""The throwaway cluster itself (tests/helpers/ceph.py): it serves RBD to the server's
client, keeps its secrets 0600 in its own directory, gives that client the one pool only,
and leaves no daemon behind."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from tests.helpers import ceph
from tests.helpers.servers import ROOT, wait_until

rados = pytest.importorskip("rados", reason="python3-rados is not installed")
rbd = pytest.importorskip("rbd", reason="python3-rbd is not installed")

pytestmark = pytest.mark.timeout(300)


def connect(cluster: ceph.CephCluster):
    client = rados.Rados(conffile=str(cluster.conf), rados_id=cluster.client_id,
                         conf={"keyring": str(cluster.keyring), "rados_osd_op_timeout": "10"})
    client.connect(timeout=30)
    return client


def test_the_servers_client_reads_back_what_it_wrote_to_an_image(ceph_cluster, rbd_image):
    name = rbd_image(8 << 20)
    client = connect(ceph_cluster)
    try:
        with client.open_ioctx(ceph_cluster.pool) as io, rbd.Image(io, name) as image:
            image.write(b"x" * 4096, 4 << 20)
            image.flush()
            assert image.read(4 << 20, 4096) == b"x" * 4096
            assert image.size() == 8 << 20
    finally:
        client.shutdown()


def test_keyrings_are_0600_and_nothing_global_is_used(ceph_cluster):
    for keyring in (ceph_cluster.keyring, ceph_cluster.admin_keyring):
        assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
    conf = ceph_cluster.conf.read_text()
    assert "/etc/ceph" not in conf and "/var/lib/ceph" not in conf


def test_the_servers_client_has_no_other_pool(ceph_cluster):
    ceph_cluster.ceph("osd", "pool", "create", "other", "8", "8", "replicated")
    try:
        client = connect(ceph_cluster)
        try:
            with client.open_ioctx("other") as io, pytest.raises(rados.PermissionError):
                io.write_full("x", b"y")
        finally:
            client.shutdown()
    finally:
        ceph_cluster.ceph("osd", "pool", "rm", "other", "other", "--yes-i-really-really-mean-it")


def ceph_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tests.helpers.ceph", *args], capture_output=True,
                          text=True, timeout=ceph.START_TIMEOUT + 60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_command_starts_a_cluster_and_another_command_stops_it(tmp_path):
    """What scripts do: `start DIR` prints where the cluster is and leaves it running;
    `stop DIR`, from another process, ends every daemon and removes DIR."""
    reason = ceph.missing()
    if reason:
        pytest.skip(reason)
    where = tmp_path / "c"
    printed = dict(line.split("=", 1) for line in ceph_cli("start", str(where)).splitlines())
    cluster = ceph.CephCluster(where)
    pids = cluster.pids()
    try:
        assert printed["CEPH_CONF"] == str(cluster.conf) and printed["CEPH_POOL"] == "rbd"
        assert len(pids) == 2 and all(ceph._alive(p) for p in pids)
        cluster.rbd("create", "--size", "1M", "rbd/x")  # it serves
    finally:
        ceph_cli("stop", str(where))
    wait_until(lambda: not any(ceph._alive(p) for p in pids), timeout=30, what="the daemons to end")
    assert not where.exists()
