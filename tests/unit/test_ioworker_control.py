"""The I/O worker's control socket (nbdserver/ioworker.py, iowire.py): no answer is ever
dropped, however far the main process falls behind in reading them."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct

import pytest

from nbdserver import iowire
from nbdserver.ioworker import IoWorker


def test_answers_wait_for_room_instead_of_being_dropped():
    """A revocation of a thousand disks has a worker answer a thousand stops while the
    main process is busy: more than the socket's buffer holds. Every one arrives."""
    main, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    worker_end.setblocking(False)
    main.setblocking(False)
    answers = 2000

    async def scenario() -> list[int]:
        worker = IoWorker(worker_end, threads=1, budget=64 << 20)
        for seq in range(answers):
            worker._send({"t": "done", "seq": seq})
        got: list[int] = []
        receiver = iowire.Receiver(main)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(got) < answers and loop.time() < deadline:
            try:
                msg = receiver.receive()
            except BlockingIOError:
                await asyncio.sleep(0)  # let the worker's writer run: the loop's turn, not a wait
                continue
            assert msg is not None
            got.append(msg[0]["seq"])
        await worker.server.shutdown(0)
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        main.close()
        worker_end.close()
    assert got == list(range(answers)), f"{answers - len(got)} answers lost or out of order"


def test_a_stop_never_forgets_a_disk_reopened_behind_it(tmp_path):
    """A stop queued before an open of the same disk (a client's last connection left,
    another came at once) must not forget the record the open then uses: a later stop,
    a revocation, has to find and lock it and wipe its key. It did not: the record was
    deleted under the open, and the revocation answered "done" with the copy serving."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    main, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker_end.setblocking(False)
    main.setblocking(False)

    def open_msg(gen: int) -> dict:
        return {"t": "open", "export": "d", "encrypted": True, "readonly": False, "flags": 0,
                "gen": gen, "spec": {"path": str(disk), "size": 1 << 20, "encrypted": True}}

    async def settle(worker: IoWorker) -> None:
        while worker._tasks:
            await asyncio.gather(*list(worker._tasks), return_exceptions=True)

    async def scenario():
        worker = IoWorker(worker_end, threads=1, budget=64 << 20)
        key = memoryview(bytes(range(64)))
        worker._dispatch(open_msg(1), key, [])
        await settle(worker)
        first = worker.held["d"].export
        assert first is not None and not first.locked
        # The stop and the reopen arrive together; the stop has not run yet.
        worker._dispatch({"t": "stop", "export": "d", "seq": 1}, memoryview(b""), [])
        worker._dispatch(open_msg(2), memoryview(bytes(range(1, 65))), [])
        await settle(worker)
        held = worker.held.get("d")
        assert held is not None, "the reopened disk's record was forgotten"
        reopened = held.export
        assert reopened is not None and not reopened.locked
        # The revocation: it must reach the reopened copy.
        worker._dispatch({"t": "stop", "export": "d", "seq": 2}, memoryview(b""), [])
        await settle(worker)
        assert reopened.locked, "a revocation answered while the copy kept serving"
        await worker.server.shutdown(0)

    try:
        asyncio.run(scenario())
    finally:
        main.close()
        worker_end.close()

def _framed(header: bytes, length: int | None = None) -> bytes:
    return struct.pack("<I", len(header) if length is None else length) + header


@pytest.mark.parametrize("payload", [
    _framed(b'{"t":'),                 # the header is not JSON
    _framed(b"[1,2,3]"),               # JSON, but not an object
    _framed(b"{}", length=4096),       # a header length past the message
    _framed(b"\xff\xfe"),              # not UTF-8
    b"\x00\x01",                       # shorter than the length field
], ids=["not-json", "not-object", "past-end", "not-utf8", "short"])
def test_a_malformed_message_closes_its_descriptors_and_wipes_its_bytes(payload):
    """A control message that cannot be parsed costs nothing: the descriptors it carried
    are closed (not left open for the life of the process) and its bytes are wiped (a
    message may carry a DEK); the next good message is read as ever."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        secret = b"K" * 64
        a.sendmsg([payload + secret], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        receiver = iowire.Receiver(b)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ValueError, match="malformed"):
            receiver.receive()
        # The received copy of the pipe's read end is gone again.
        assert set(os.listdir("/proc/self/fd")) <= before
        assert secret not in receiver.buf and not any(receiver.buf[:len(payload) + 64])
        iowire.send(a, iowire.message({"t": "hello"}, b"tail"))
        header, tail, fds = receiver.receive()
        assert header == {"t": "hello"} and bytes(tail) == b"tail" and fds == []
        tail.release()
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()
