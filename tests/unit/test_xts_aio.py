"""XtsLayer's requests over a lower layer that runs them itself (librbd aio under an RBD
disk): whole sectors encrypted in place and decrypted on completion, in dm-crypt's
format (checked against `cryptography`), the stripe lock held until the write lands.
The lower layer here is a file whose requests complete on a later turn of the loop."""

from __future__ import annotations

import asyncio
import os

import pytest

from nbdserver.backend import FileBackend
from nbdserver.crypto import XtsLayer
from tests.helpers.images import dmcrypt_sector

S = 4096
SIZE = 1 << 20


class LaterFile(FileBackend):
    """A file whose aio_* complete on the loop's next turn, not at once."""

    def aio_pread(self, buf, offset, loop):
        fut = loop.create_future()
        loop.call_soon(lambda: (self.pread(memoryview(buf), offset), fut.set_result(None)))
        return fut

    def aio_pwrite(self, data, offset, loop):
        payload = bytes(data)  # as RbdBackend: copied when started
        fut = loop.create_future()
        loop.call_soon(lambda: (self.pwrite(memoryview(payload), offset), fut.set_result(None)))
        return fut


@pytest.fixture
def layer(tmp_path):
    key = bytearray(os.urandom(64))
    lower = LaterFile(tmp_path / "disk.img", size=SIZE)
    layer = XtsLayer(lower, bytearray(key))
    yield layer, bytes(key), tmp_path / "disk.img"
    layer.close()


def test_aio_write_and_read_are_dmcrypt_sectors(layer):
    xts, key, path = layer
    plain = os.urandom(3 * S)

    async def run():
        loop = asyncio.get_running_loop()
        data = bytearray(plain)
        fut = xts.aio_pwrite(data, 5 * S, loop)
        # The stripe stays locked until the write lands: a second write of it must wait
        # (BlockingIOError: the server hands it to a worker).
        with pytest.raises(BlockingIOError):
            xts.aio_pwrite(bytearray(S), 6 * S, loop)
        await fut
        await xts.aio_pwrite(bytearray(S), 60 * S, loop)  # another stripe: not held
        back = bytearray(3 * S)
        await xts.aio_pread(back, 5 * S, loop)
        hole = bytearray(S)
        await xts.aio_pread(hole, 100 * S, loop)
        return bytes(back), bytes(hole)

    back, hole = asyncio.run(run())
    assert back == plain and hole == bytes(S)
    stored = path.read_bytes()[5 * S:8 * S]
    for i in range(3):
        assert stored[i * S:(i + 1) * S] == dmcrypt_sector(key, 5 + i, plain[i * S:(i + 1) * S])


def test_aio_takes_whole_sectors_only(layer):
    xts, _, _ = layer

    async def run():
        loop = asyncio.get_running_loop()
        for offset, n in ((512, S), (0, 512), (0, 0)):
            with pytest.raises(BlockingIOError):
                xts.aio_pread(bytearray(n), offset, loop)
            with pytest.raises(BlockingIOError):
                xts.aio_pwrite(bytearray(n), offset, loop)

    asyncio.run(run())


def test_a_file_layer_starts_nothing(tmp_path):
    xts = XtsLayer(FileBackend(tmp_path / "plain.img", size=SIZE), bytearray(os.urandom(64)))
    loop = asyncio.new_event_loop()
    try:
        assert not xts.starts_requests
        with pytest.raises(BlockingIOError):
            xts.aio_pread(bytearray(S), 0, loop)
    finally:
        loop.close()
        xts.close()


def test_a_staged_write_commits_by_aio(layer):
    """A large write encrypted as it arrived (EncryptingStage) goes down by aio, its
    sectors locked until it lands."""
    xts, key, path = layer
    plain = os.urandom(16 * S)

    async def run():
        loop = asyncio.get_running_loop()
        stage = xts.stage_write(32 * S, len(plain))
        for at in range(0, len(plain), 5000):  # pieces that cut sectors
            stage.take(memoryview(plain)[at:at + 5000])
        fut = stage.aio_commit(loop)
        with pytest.raises(BlockingIOError):  # its sectors are locked meanwhile
            xts.aio_pwrite(bytearray(S), 40 * S, loop)
        await fut
        back = bytearray(len(plain))
        await xts.aio_pread(back, 32 * S, loop)
        return bytes(back)

    assert asyncio.run(run()) == plain
    stored = path.read_bytes()[32 * S:48 * S]
    assert stored[5 * S:6 * S] == dmcrypt_sector(key, 37, plain[5 * S:6 * S])
