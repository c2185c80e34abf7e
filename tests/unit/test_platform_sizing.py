"""`DiskSizing` alone: built from fakes of exactly what its constructor declares, which
is everything it uses (no `Platform` behind it)."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest

from nbdserver.platform.errors import BadRequest
from nbdserver.platform.model import VolumeKind
from nbdserver.platform.operations import Operations
from nbdserver.platform.sealed import SealedBackend
from nbdserver.platform.sizing import DiskSizing


class FakeState:
    def __init__(self):
        self.put = []

    def put_volume(self, v) -> None:
        self.put.append(v.size)


class FakeCatalog:
    def __init__(self, export=None):
        self.export = export

    def get(self, name):
        return self.export


def _sizing(tmp_path, size=1 << 20, export=None):
    path = tmp_path / "d.img"
    with open(path, "wb") as f:
        f.truncate(size)
    disk = SimpleNamespace(name="d", size=size, path=str(path))
    state = FakeState()

    def find_volume(kind, name):
        assert (kind, name) == (VolumeKind.DISK, "d")
        return disk

    sizing = DiskSizing(state, storage=None, catalog=FakeCatalog(export), operations=Operations(),
                        find_volume=find_volume, show_disk=lambda name: {"size": disk.size},
                        opening=lambda export: None)
    return sizing, state, path


def test_a_disk_grows_through_its_declared_dependencies_alone(tmp_path):
    export = SimpleNamespace(backend=SealedBackend(1 << 20))
    sizing, state, path = _sizing(tmp_path, export=export)

    async def grow():
        return await sizing.resize_disk("d", 2 << 20)

    assert asyncio.run(grow()) == {"size": 2 << 20}
    assert os.path.getsize(path) == 2 << 20
    assert state.put == [2 << 20]
    assert export.backend.size == 2 << 20  # what the next handshake announces


def test_a_shrink_is_refused_before_any_work(tmp_path):
    sizing, state, path = _sizing(tmp_path)
    with pytest.raises(BadRequest, match="only grows"):
        sizing.resize_disk("d", 1 << 19)
    assert state.put == [] and os.path.getsize(path) == 1 << 20


def test_usage_counts_the_allocated_bytes(tmp_path):
    sizing, _, path = _sizing(tmp_path)
    with open(path, "r+b") as f:
        f.write(b"x" * 4096)
    usage = sizing.disk_usage("d")
    assert usage["size"] == 1 << 20 and 4096 <= usage["allocated"] < 1 << 20
