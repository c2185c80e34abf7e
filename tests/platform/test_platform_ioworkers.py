"""I/O worker processes (issue 14, item 1): `nbdserver serve --io-processes 2` hands every
plain-TCP connection in transmission to a worker process, and the disk stays one disk.

Which process serves a connection is read from /proc: the process holding the server
side of the TCP connection. Connections of one disk spread over both workers; data
written on one is read on the other; a FLUSH on one leaves no dirty page of the file
(cachestat) whichever wrote it; a revocation fails I/O on every worker and wipes the
DEK from every process's memory; a snapshot taken during writes on both workers is a
point in time of each; sub-sector writes to one sector from two workers lose nothing
(the cross-process RMW locks); and a worker killed with SIGKILL costs its clients their
connections only: the server serves, counts no ghost attachment, and starts another.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import struct
import threading
import time

import nbd
import pytest

from nbdserver.protocol.constants import NBD_CMD_READ, NBD_CMD_WRITE
from tests.helpers.nbdraw import RawClient
from tests.helpers.platform import NbdServerProcess, Stack, Writer, pattern
from tests.helpers.procs import children, connections_held
from tests.helpers.servers import wait_until
from tests.platform.conftest import _finish
from tests.platform.test_platform_revocation import _memory_hits, encoded_forms

ROOT = os.geteuid() == 0
IO_PROCESSES = ["--io-processes", "2"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("ioworkers"), nbd_args=IO_PROCESSES).start()
    wait_workers_ready(s)
    yield s
    _finish(s)


# -- which process serves what
def server(stack: Stack) -> NbdServerProcess:
    assert stack.nb is not None, "the stack's nbdserver is not running"
    return stack.nb


def workers(stack: Stack) -> list[int]:
    """The server's child processes (its I/O workers)."""
    return children(server(stack).pid)


def served_by(stack: Stack) -> dict[int, int]:
    """pid -> NBD connections it holds, over the main process and its workers."""
    port = int(server(stack).nbd_address.rsplit(":", 1)[1])
    return connections_held([server(stack).pid, *workers(stack)], port)


def wait_workers_ready(stack: Stack, n: int = 2) -> None:
    """Until `n` workers run and the server logged each one ready (it hands connections
    only to a worker that said hello)."""
    def ready():
        pids = workers(stack)
        text = server(stack).stderr_text()
        return len(pids) == n and all(f"I/O worker {pid} ready" in text for pid in pids)
    wait_until(ready, 30, what=f"{n} I/O workers ready")


def connect_on_new_worker(stack: Stack, disk: str, connect=None):
    """Connect, and return (connection, the pid of the worker that took it)."""
    before = served_by(stack)
    h = (connect or stack.connect)(disk)

    def moved():
        now = served_by(stack)
        grown = [p for p, n in now.items() if n > before.get(p, 0)]
        return grown[0] if len(grown) == 1 else None
    pid = wait_until(moved, 10, what="the new connection to be held by one process")
    return h, pid


def create_disk_file(stack: Stack, disk: str, *args) -> str:
    """Create a disk; the path of its file (the one that appeared in the data directory)."""
    before = set(stack.nb_dir.rglob("*.img"))
    stack.create_disk(disk, *args)
    [path] = set(stack.nb_dir.rglob("*.img")) - before
    return str(path)


def needles(stack: Stack, disk: str) -> dict[str, bytes]:
    dek = stack.dek(disk)
    return {"dek": dek, "key1": dek[:32], "key2": dek[32:], **encoded_forms(dek)}


# -- the tests
def test_connections_spread_over_workers_and_share_the_disk(stack):
    c = stack.customer_key("iow-spread", "k1", "des-iow-spread")
    stack.create_disk("spread", "--size", "16M", "--des", c["des"])
    wait_workers_ready(stack)
    a, pa = connect_on_new_worker(stack, "spread")
    b, pb = connect_on_new_worker(stack, "spread")
    assert {pa, pb} == set(workers(stack)), "two connections of one disk went to one worker"
    assert served_by(stack)[stack.nb.pid] == 0, "the main process kept a connection"
    assert b.can_multi_conn(), "NBD_FLAG_CAN_MULTI_CONN must stay advertised"

    a.pwrite(pattern(1, 65536), 0)
    b.pwrite(pattern(2, 4096), 65536)
    assert b.pread(65536, 0) == pattern(1, 65536)
    assert a.pread(4096, 65536) == pattern(2, 4096)
    shown = stack.disk("spread")["serving"]
    assert shown["connections"] == 2 and len(shown["clients"]) == 2
    a.shutdown()
    b.shutdown()
    wait_until(lambda: stack.disk("spread")["serving"]["connections"] == 0, 10,
               what="both attachments to end when the workers report their connections' end")


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def dirty_pages(path: str) -> int:
    """Dirty page-cache pages of a file (cachestat(2), Linux 6.5+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    rng = (ctypes.c_uint64 * 2)(0, 0)  # the whole file
    st = _CacheStat()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            pytest.skip(f"no cachestat here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return st.nr_dirty


def test_flush_on_one_worker_covers_writes_on_the_other(stack):
    c = stack.customer_key("iow-flush", "k1", "des-iow-flush")
    path = create_disk_file(stack, "flush", "--size", "64M", "--des", c["des"])
    a, pa = connect_on_new_worker(stack, "flush")
    b, pb = connect_on_new_worker(stack, "flush")
    assert pa != pb
    for attempt in range(5):  # the kernel's own writeback may clean a round first
        for i in range(64):
            a.pwrite(pattern(attempt * 64 + i, 65536), i * 65536)  # no FUA: dirty pages
        if dirty_pages(path):
            break
    else:
        pytest.skip("the kernel wrote the pages back before the test could flush them")
    b.flush()
    assert dirty_pages(path) == 0, "a FLUSH on another worker left writes not on stable storage"
    a.shutdown()
    b.shutdown()


def test_revocation_stops_every_worker_and_wipes_every_copy(stack):
    c = stack.customer_key("iow-rev", "k1", "des-iow-rev")
    stack.create_disk("rev", "--size", "16M", "--des", c["des"])
    keys = needles(stack, "rev")
    before = served_by(stack)
    writers = [Writer(stack, "rev", base=i << 22, span=1 << 20, block=4096) for i in range(2)]
    for w in writers:
        w.start()
    wait_until(lambda: all(w.count > 20 for w in writers), 20, what="both writers to run")
    now = served_by(stack)
    busy = [p for p in workers(stack) if now.get(p, 0) > before.get(p, 0)]
    assert len(busy) == 2, f"the writers are not on two workers: {before} -> {now}"
    if ROOT:
        for pid in busy:
            assert _memory_hits(pid, keys), "the scan must see the DEK in a serving worker"

    stack.keyservice("key", "disable", "iow-rev", "k1")
    answered = time.monotonic()
    wait_until(lambda: all(w.error is not None for w in writers), 5,
               what="I/O to fail on both workers after the revocation")
    latency = max(w.first_error_at for w in writers) - answered
    print(f"revocation: I/O failed on both workers {latency * 1000:.0f} ms after the answer")
    stack.wait_serving("rev", "locked")
    if ROOT:
        for pid in [stack.nb.pid, *busy]:
            wait_until(lambda: _memory_hits(pid, keys) == {}, 5,
                       what=f"the DEK to be wiped from process {pid}")
    for w in writers:
        w.close()

    stack.keyservice("key", "enable", "iow-rev", "k1")
    stack.wait_serving("rev")
    h = stack.connect("rev")
    for w in writers:
        w.verify(h)  # every acknowledged write survived, on whichever worker it was made
    h.shutdown()


def test_snapshot_during_writes_on_two_workers_is_a_point_in_time(stack):
    c = stack.customer_key("iow-snap", "k1", "des-iow-snap")
    stack.create_disk("snap", "--size", "16M", "--des", c["des"])
    block, span = 65536, 2 << 20
    writers = [Writer(stack, "snap", base=i * (8 << 20), span=span, block=block, reads=False)
               for i in range(2)]
    for w in writers:
        w.start()
    wait_until(lambda: all(w.count > 2 * span // block for w in writers), 30,
               what="both writers to wrap around their spans")
    acked_before = [w.count for w in writers]
    stack.nbdserver("snapshot", "create", "snap-s", "--disk", "snap", "--quiet")
    for w in writers:
        w.close()
        assert w.error is None, w.error
    stack.create_disk("snap-copy", "--source", "snapshot:snap-s")
    h = stack.connect("snap-copy")
    slots = span // block
    for w, floor in zip(writers, acked_before, strict=True):
        tags = []
        for j in range(slots):
            got = h.pread(block, w.base + j * block)
            tag = None if got == bytes(block) else struct.unpack_from("<I", got)[0]
            assert tag is None or got == pattern(tag, block), f"slot {j} holds a torn block"
            tags.append(tag)
        k = max(t for t in tags if t is not None) + 1  # the writes the snapshot saw
        assert k >= floor, "the snapshot lost writes acknowledged before it was asked for"
        for j, tag in enumerate(tags):
            expected = max((i for i in range(j, k, slots)), default=None)
            assert tag == expected, (f"slot {j} holds write {tag}, the snapshot's point in time "
                                     f"({k} writes) says {expected}: not one instant")
    h.shutdown()


def _raw(stack: Stack, disk: str) -> RawClient:
    """A client that connects with NBD_OPT_EXPORT_NAME (no block size agreed): the server
    takes byte-granular requests from it."""
    host, port = server(stack).nbd_address.rsplit(":", 1)
    c = RawClient((host, int(port)))
    c.start()
    c.export_name(disk)
    return c


def _write_slots(client: RawClient, writes: list[tuple[int, bytes]], errors: list) -> None:
    try:
        for i in range(0, len(writes), 32):  # pipelined, 32 in flight
            batch = writes[i:i + 32]
            for n, (off, data) in enumerate(batch):
                client.request(NBD_CMD_WRITE, off, len(data), cookie=n + 1, payload=data)
            for _ in batch:
                err, _, _ = client.simple_reply()
                if err:
                    errors.append(err)
    except Exception as e:  # reported by the test thread
        errors.append(e)


def test_unaligned_writes_to_one_sector_from_two_workers_lose_nothing(stack):
    c = stack.customer_key("iow-rmw", "k1", "des-iow-rmw")
    stack.create_disk("rmw", "--size", "16M", "--des", c["des"])
    a, pa = connect_on_new_worker(stack, "rmw", connect=lambda d: _raw(stack, d))
    b, pb = connect_on_new_worker(stack, "rmw", connect=lambda d: _raw(stack, d))
    assert pa != pb, "the two clients are on one worker"
    sectors, slot = 16, 64  # 64 slots of 64 bytes in each 4 KiB sector
    rng = random.Random(14)
    plan: dict[int, list] = {0: [], 1: []}
    for s in range(sectors):
        for k in range(4096 // slot):
            off = s * 4096 + k * slot
            plan[k % 2].append((off, bytes([1 + (k % 2)]) * 4 + off.to_bytes(4, "little") * 15))
    for writes in plan.values():
        rng.shuffle(writes)
    errors: list = []
    threads = [threading.Thread(target=_write_slots, args=(cl, plan[i], errors))
               for i, cl in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    a.request(NBD_CMD_READ, 0, sectors * 4096, cookie=99)
    err, _, data = a.simple_reply(sectors * 4096)
    assert not err
    lost = [off for writes in plan.values() for off, d in writes if data[off:off + slot] != d]
    assert not lost, f"{len(lost)} sub-sector writes lost to a concurrent RMW on the other worker"
    a.close()
    b.close()


def test_a_killed_worker_is_replaced_and_leaves_nothing_behind(make_stack):
    stack = make_stack(nbd_args=IO_PROCESSES)
    c = stack.customer_key("iow-kill", "k1", "des-iow-kill")
    stack.create_disk("kill", "--size", "16M", "--des", c["des"])
    wait_workers_ready(stack)
    a, pa = connect_on_new_worker(stack, "kill")
    b, pb = connect_on_new_worker(stack, "kill")
    assert pa != pb
    a.pwrite(pattern(7, 4096), 0)
    os.kill(pa, signal.SIGKILL)
    wait_for_eio_or_gone(a)
    b.pwrite(pattern(8, 4096), 4096)  # the other worker's client goes on
    wait_until(lambda: stack.disk("kill")["serving"]["connections"] == 1, 10,
               what="the dead worker's attachment to be forgotten")
    wait_until(lambda: pa not in workers(stack), 20, what="the dead worker to be gone")
    wait_workers_ready(stack)  # a new one in its place
    h, ph = connect_on_new_worker(stack, "kill")
    assert h.pread(4096, 0) == pattern(7, 4096) and h.pread(4096, 4096) == pattern(8, 4096)
    h.shutdown()
    b.shutdown()
    wait_until(lambda: stack.disk("kill")["serving"]["connections"] == 0, 10,
               what="every attachment to end")
    assert stack.nb.alive()


def wait_for_eio_or_gone(h, timeout: float = 10.0) -> None:
    """The client's connection died with its worker: I/O fails (EIO or disconnected)."""
    def failed():
        try:
            h.pread(4096, 0)
            return False
        except nbd.Error:
            return True
    wait_until(failed, timeout, what="the dead worker's client to fail")

