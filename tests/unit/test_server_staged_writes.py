"""A large WRITE is encrypted as it arrives (EncryptingStage). If the disk's key is
revoked, or its backend replaced, between the first and the last byte of the payload,
that write must fail with EIO and write nothing, and the connection must go on.

The server runs in this process (tests/helpers/inproc.py) so that the export can be
locked and given a new backend at that exact moment, the way the platform does on
revocation and re-grant (platform/service.py).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from nbdserver.backend import FileBackend
from nbdserver.crypto import XtsLayer, generate_dek
from nbdserver.exports import Export, ExportCatalog
from nbdserver.protocol.constants import NBD_CMD_READ, NBD_CMD_WRITE, NBD_EIO
from tests.helpers.inproc import ServerThread
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


class Recording(XtsLayer):
    """An XtsLayer that keeps the stages it hands out, so the test can see one fill."""

    def __init__(self, *a):
        super().__init__(*a)
        self.stages = []

    def stage_write(self, offset, length):
        stage = super().stage_write(offset, length)
        self.stages.append(stage)
        return stage


@pytest.mark.parametrize("close_old", [True, False], ids=["revoked", "replaced"])
def test_a_write_whose_disk_changes_mid_payload_fails_and_writes_nothing(tmp_path, close_old):
    path = tmp_path / "d.img"
    key = generate_dek()
    old = Recording(FileBackend(path, size=8 * MiB), bytearray(key))
    export = Export("enc", old)
    catalog = ExportCatalog()
    catalog.add(export)
    plain = os.urandom(MiB)
    first = 300 * 1024 + 5  # ends inside a sector
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "enc") as c:
        c.request(NBD_CMD_WRITE, 2 * MiB, len(plain), cookie=1, payload=plain[:first])
        wait_until(lambda: old.stages and old.stages[0].received == first, what="the first piece staged")

        def swap():
            export.lock("key revoked")
            if close_old:
                old.close()
            export.unlock(XtsLayer(FileBackend(path), bytearray(key)))
        srv.call(swap)

        c.send(plain[first:])
        assert c.simple_reply()[:2] == (NBD_EIO, 1)
        # Nothing of it reached the file, and the connection serves the next write.
        with open(path, "rb") as f:
            f.seek(2 * MiB)
            assert f.read(MiB) == bytes(MiB)
        c.request(NBD_CMD_WRITE, 2 * MiB, len(plain), cookie=2, payload=plain)
        assert c.simple_reply()[:2] == (0, 2)
        c.request(NBD_CMD_READ, 2 * MiB, len(plain), cookie=3)
        assert c.simple_reply(len(plain)) == (0, 3, plain)
    if not close_old:
        old.close()


def test_the_rest_of_a_large_payload_is_received_straight_into_its_stage(tmp_path):
    """What arrives after a large WRITE's header chunk goes from the socket into the
    stage's own buffer (Connection.get_buffer), not through the receive buffer."""
    path = tmp_path / "d.img"
    key = generate_dek()
    layer = Recording(FileBackend(path, size=8 * MiB), bytearray(key))
    catalog = ExportCatalog()
    catalog.add(Export("enc", layer))
    plain = os.urandom(MiB)
    first = 1000
    in_place = []
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "enc") as c:
        c.request(NBD_CMD_WRITE, MiB, len(plain), cookie=1, payload=plain[:first])
        wait_until(lambda: layer.stages and layer.stages[0].received == first,
                   what="the header's chunk taken")
        stage = layer.stages[0]
        took = stage.took

        def counted(n):
            in_place.append(n)
            took(n)
        stage.took = counted
        c.send(plain[first:])
        assert c.simple_reply()[:2] == (0, 1)
        c.request(NBD_CMD_READ, MiB, len(plain), cookie=2)
        assert c.simple_reply(len(plain)) == (0, 2, plain)
    assert sum(in_place) == len(plain) - first
    layer.close()
