"""The ring's task-work modes (`RingQueue(taskrun=...)`): `signal` (the kernel's default:
a completion interrupts the loop's thread), `coop` (IORING_SETUP_COOP_TASKRUN: it waits
for the thread's next system call) and `defer` (SINGLE_ISSUER | DEFER_TASKRUN: it waits
until collect() enters the ring). In every mode the registered eventfd must still wake
the loop and collect() must bring back every read and write: cold buffered reads (whose
copy is task work), O_DIRECT reads, short reads at the end of the file, and writes."""

from __future__ import annotations

import os
import random

import pytest

from nbdserver.backend import aligned_buffer
from tests.helpers.images import drop_cache
from tests.unit.test_readq import collect_all, ring_error

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
S = 4096
MODES = ("signal", "coop", "defer")


@pytest.fixture(params=MODES)
def ring(request):
    if ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    from nbdserver._uring import RingQueue
    q = RingQueue(16, taskrun=request.param)
    assert q.taskrun == request.param  # this kernel takes every mode (6.1 and later)
    yield q
    q.close()


def test_every_read_and_write_comes_back_in_every_mode(ring, tmp_path):
    path = tmp_path / "d.img"
    data = os.urandom(8 * MiB + 1000)  # a short last read
    path.write_bytes(data)
    drop_cache(path)
    rng = random.Random(14)
    buffered = os.open(path, os.O_RDONLY)
    direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        wanted = {}
        for i in range(100):  # more than the ring holds: the backlog too
            offset = rng.randrange(0, len(data) // S) * S
            buf = bytearray(S)
            wanted[i] = (buf, offset)
            ring.submit(i, buf, buffered if i % 2 else direct, offset, align=0 if i % 2 else S)
        new = os.urandom(S)
        ring.submit_write("w", new, direct, 0, align=S)
        results = collect_all(ring, 101)
    finally:
        os.close(buffered)
        os.close(direct)
    assert results.pop("w") == S
    for i, (buf, offset) in wanted.items():
        expect = data[offset:offset + S]
        assert results[i] == S and buf == expect + bytes(S - len(expect)), i
    with open(path, "rb") as f:
        assert f.read(S) == new
    assert ring.in_flight == 0


def test_close_waits_for_reads_in_every_mode(ring, tmp_path):
    path = tmp_path / "c.img"
    path.write_bytes(os.urandom(MiB))
    drop_cache(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        bufs = [aligned_buffer(S) for _ in range(8)]
        for i, buf in enumerate(bufs):
            ring.submit(i, buf, fd, i * 16 * S)
        results = dict(ring.close())
    finally:
        os.close(fd)
    assert sorted(results) == list(range(8)) and all(r == S for r in results.values())


def test_an_unknown_mode_is_refused():
    if ring_error() is not None:
        pytest.skip(f"io_uring is not available here: {ring_error()}")
    from nbdserver._uring import RingQueue
    with pytest.raises(ValueError, match="signal, coop or defer"):
        RingQueue(4, taskrun="poll")


@pytest.mark.parametrize("setting, expect", [(None, "signal"), ("defer", "defer"), (" COOP ", "coop"),
                                             ("poll", "signal")])
def test_the_environment_picks_the_mode(monkeypatch, caplog, setting, expect):
    from nbdserver import readqueue
    if setting is None:
        monkeypatch.delenv(readqueue.TASKRUN_ENV, raising=False)
    else:
        monkeypatch.setenv(readqueue.TASKRUN_ENV, setting)
    assert readqueue._taskrun() == expect
    assert ("is none of" in caplog.text) == (setting == "poll")


def test_a_server_on_a_deferred_ring_answers_reads_and_writes(tmp_path, monkeypatch):
    """The server's loop thread makes the ring and is its single issuer."""
    import asyncio

    from nbdserver import readqueue
    from nbdserver.exports import Export, ExportCatalog
    from nbdserver.protocol.constants import NBD_CMD_READ
    from tests.helpers.inproc import ServerThread
    from tests.helpers.nbdraw import RawClient
    from tests.unit.test_server_ring_writes import open_disk, pipeline_writes, use_queue
    use_queue(monkeypatch, "uring")
    monkeypatch.setenv(readqueue.TASKRUN_ENV, "defer")
    backend = open_disk(tmp_path / "d.img", True)
    catalog = ExportCatalog()
    catalog.add(Export("d", backend))
    writes = [(i * 64 * S, os.urandom(S)) for i in range(16)]
    with ServerThread(asyncio.new_event_loop, catalog) as srv, \
            RawClient.connected(srv.address, "d") as c:
        assert pipeline_writes(c, writes) == dict.fromkeys(range(16), 0)
        for off, data in writes:  # cache=none: every read goes on the ring too
            c.request(NBD_CMD_READ, off, S, cookie=off)
            assert c.simple_reply(S) == (0, off, data)
        assert srv.server.read_queue.peak >= 1
        assert srv.server.read_queue.taskrun == "defer"  # the kernel took it (6.1 and later)
    backend.close()
