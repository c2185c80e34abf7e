"""Where volumes live (nbdserver/platform/storage.py) and how `nbdserver serve` is told:
what is refused before anything reaches a cluster."""

from __future__ import annotations

import click
import pytest

from nbdserver.cli import ceph_client
from nbdserver.platform import backing
from nbdserver.platform.errors import BadRequest
from nbdserver.platform.model import VolumeKind
from nbdserver.platform.storage import CephClient, VolumeStorage, parse_storage


@pytest.mark.parametrize("text", ["rbd:", "rbd:a/b", "rbd:a@s", "ceph:a", "", "FILE", "rbd:a\nb"])
def test_storage_written_wrong_is_refused(text):
    with pytest.raises(ValueError, match="storage is written"):
        parse_storage(text)


def test_rbd_storage_needs_a_cluster(tmp_path):
    with pytest.raises(ValueError, match="needs --ceph-conf"):
        VolumeStorage(str(tmp_path), "rbd:disks")
    files = VolumeStorage(str(tmp_path))
    assert files.pool_for(None) is None and files.pool_for("file") is None
    with pytest.raises(BadRequest, match="no Ceph cluster"):
        files.pool_for("rbd:disks")
    with pytest.raises(BadRequest, match="storage is written"):
        files.pool_for("rbd:")


def test_locations_of_files_and_images(tmp_path):
    storage = VolumeStorage(str(tmp_path), "rbd:disks", CephClient(str(tmp_path / "ceph.conf"), "nbd"))
    image = storage.new_location(VolumeKind.DISK, "disks", "p1")
    assert image.startswith("rbd:disks/nbdserver.p1.disk.") and storage.pool_of(image) == "disks"
    # Stored as it is, wherever the data directory moves.
    assert backing.stored_path(str(tmp_path), image) == image
    assert backing.resolved_path("/elsewhere", image) == image
    assert backing.problem(image, 1 << 30) is None  # examined at attach, not per listing
    spec = storage.spec(image, cache="none")
    assert (spec.pool, spec.client_id, spec.encrypted) == ("disks", "nbd", True)
    file = storage.new_location(VolumeKind.SNAPSHOT, None)
    assert file.startswith(str(tmp_path / "snapshots")) and storage.pool_of(file) is None


def test_a_keyring_others_can_read_is_refused(tmp_path):
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\n")
    keyring = tmp_path / "keyring"
    keyring.write_text("[client.nbd]\n")
    keyring.chmod(0o644)
    with pytest.raises(click.UsageError, match="readable by others"):
        ceph_client(str(conf), "nbd", str(keyring))
    keyring.chmod(0o600)
    assert ceph_client(str(conf), "nbd", str(keyring))["keyring"] == str(keyring)
    with pytest.raises(click.UsageError, match="needs --ceph-conf"):
        ceph_client(None, "nbd", str(keyring))
    with pytest.raises(click.UsageError, match="no such file"):
        ceph_client(str(tmp_path / "missing.conf"), "nbd", None)
