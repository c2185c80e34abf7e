"""RbdBackend's librbd aio requests, completed on an asyncio loop: many in flight from
the loop's own thread, no worker, results and errors as the synchronous calls give."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from dataclasses import replace

import pytest

from nbdserver.rbdbackend import LockState, RbdSpec

KiB, MiB = 1 << 10, 1 << 20
pytestmark = pytest.mark.timeout(120)


def spec_of(cluster, image: str, **kw) -> RbdSpec:
    return RbdSpec(cluster.pool, image, str(cluster.conf), cluster.client_id, str(cluster.keyring), **kw)


def test_sixty_four_requests_in_flight_from_the_loop_thread(ceph_cluster, rbd_image):
    backend = spec_of(ceph_cluster, rbd_image(32 * MiB)).open()
    blocks = {i * 256 * KiB: os.urandom(64 * KiB) for i in range(64)}
    threads_before = threading.active_count()

    async def run():
        loop = asyncio.get_running_loop()
        writes = [backend.aio_pwrite(d, off, loop) for off, d in blocks.items()]
        assert not any(w.done() for w in writes)  # started, not run: none finished inline
        await asyncio.gather(*writes)
        await backend.aio_flush(loop)
        bufs = {off: bytearray(len(d)) for off, d in blocks.items()}
        await asyncio.gather(*(backend.aio_pread(b, off, loop) for off, b in bufs.items()))
        tail = bytearray(8 * KiB)  # a hole reads as zeros
        await backend.aio_pread(tail, 20 * MiB, loop)
        await backend.aio_discard(0, 256 * KiB, loop)
        first = bytearray(64 * KiB)
        await backend.aio_pread(first, 0, loop)
        return bufs, tail, first

    try:
        bufs, tail, first = asyncio.run(run())
    finally:
        backend.close()
    for off, d in blocks.items():
        assert bytes(bufs[off]) == d, f"block at {off}"
    assert tail == bytes(len(tail)) and first == bytes(len(first))
    assert ceph_cluster.read_image(backend.spec.image, 256 * KiB, 64 * KiB) == blocks[256 * KiB]
    # No thread of ours took part: at most librbd's own, which the open already started.
    assert threading.active_count() <= threads_before + 2


def test_aio_refuses_until_the_lock_is_held_and_fails_a_lost_open(ceph_cluster, rbd_image):
    spec = spec_of(ceph_cluster, rbd_image(4 * MiB))
    holder = spec.open()
    waiting = replace(spec, standby=True).open()
    try:
        assert waiting.lock_state is LockState.STANDBY

        async def start():
            loop = asyncio.get_running_loop()
            with pytest.raises(BlockingIOError):
                waiting.aio_pwrite(b"x" * 4096, 0, loop)
            waiting.lock_state = LockState.LOST  # as after the OSDs refused it
            with pytest.raises(OSError) as e:
                waiting.aio_pread(bytearray(4096), 0, loop)
            assert e.value.errno == errno.EIO
        asyncio.run(start())
    finally:
        waiting.close()
        holder.close()
