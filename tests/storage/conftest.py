"""Fixtures for disks on Ceph RBD: one throwaway cluster per test session
(tests/helpers/ceph.py: a monitor and a memstore OSD on 127.0.0.1), and a fresh RBD
image per test, so tests share the cluster and nothing else."""

from __future__ import annotations

import itertools

import pytest

from tests.helpers import ceph

_names = itertools.count()


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory):
    reason = ceph.missing()
    if reason:
        pytest.skip(reason)
    with ceph.CephCluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


@pytest.fixture
def rbd_image(ceph_cluster):
    """make(size) -> the name of a new RBD image in the cluster's pool; removed at the end."""
    made: list[str] = []

    def make(size: int) -> str:
        name = f"t{next(_names)}"
        ceph_cluster.rbd("create", "--size", f"{size}B", f"{ceph_cluster.pool}/{name}")
        made.append(name)
        return name

    yield make
    for name in made:
        ceph_cluster.rbd("rm", "--no-progress", f"{ceph_cluster.pool}/{name}")
