"""The I/O worker's control socket (nbdserver/ioworker.py, iowire.py): no answer is ever
dropped, however far the main process falls behind in reading them."""

from __future__ import annotations

import asyncio
import socket

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
