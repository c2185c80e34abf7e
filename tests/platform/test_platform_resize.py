"""Online resize (nbdserver/platform/sizing.py) with its interleavings forced: the platform
runs in the test's process over the real key service, one key-service call held at a
gate (`run` and `Gate` of tests/platform/test_platform_locking.py).

- A copy holding the disk (a snapshot being made of it) refuses the resize with 409,
  naming the copy; once the copy ended the same resize succeeds.
- An attach whose open is still unwrapping the key is waited for, not refused: the
  client attaches, then the disk grows under it, its key still loaded.

The end-to-end side (clients attached in the main process and on I/O workers, kill -9)
is tests/platform/test_cli_lifecycle.py's.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from nbdserver.platform.model import VolumeKind
from nbdserver.platform.operations import Busy
from nbdserver.platform.serving import is_open
from tests.platform.test_platform_locking import DEADLINE, Gate, run

MiB = 1 << 20


def test_a_copy_of_the_disk_refuses_its_resize(keyservice, tmp_path):
    async def body(p, access, gates):
        await p.create_disks("r1", size="1M", des="des1")
        snap = p.create_snapshot("s1", "r1")  # the disk is claimed from here to its end
        with pytest.raises(Busy, match="snapshot 's1' of disk 'r1' is in progress") as refused:
            p.resize_disk("r1", "2M")
        assert refused.value.status == 409
        await asyncio.wait_for(snap, DEADLINE)
        assert p.state.get_volume(VolumeKind.DISK, "r1").size == MiB
        await asyncio.wait_for(p.resize_disk("r1", "2M"), DEADLINE)
        assert p.state.get_volume(VolumeKind.SNAPSHOT, "s1").size == MiB  # the copy kept its size
        assert p.state.get_volume(VolumeKind.DISK, "r1").size == 2 * MiB

    run(keyservice, tmp_path, body)


def test_a_resize_waits_for_an_attach_in_progress(keyservice, tmp_path):
    async def body(p, access, gates):
        await p.create_disks("r2", size="1M", des="des1")
        path = p.state.get_volume(VolumeKind.DISK, "r2").path
        held = Gate("unwrap_key", "des1")
        gates.append(held)
        client = object()
        attach = asyncio.ensure_future(p.catalog.attach("r2", client))
        await asyncio.wait_for(held.entered.wait(), DEADLINE)
        resize = p.resize_disk("r2", "2M")
        # A bounded look that it waits (a negative check, not a synchronisation).
        done, _ = await asyncio.wait([resize], timeout=0.2)
        assert not done and os.path.getsize(path) == MiB
        held.released.set()
        export = await asyncio.wait_for(attach, DEADLINE)
        assert export is not None and client in export.attachments
        shown = await asyncio.wait_for(resize, DEADLINE)
        assert shown["size"] == 2 * MiB and os.path.getsize(path) == 2 * MiB
        assert is_open(export) and export.backend.size == 2 * MiB  # grown in place, key kept
        p.catalog.detach(export, client)

    run(keyservice, tmp_path, body)
