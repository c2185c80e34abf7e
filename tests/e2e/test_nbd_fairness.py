"""Fairness on one connection: a request sent to a worker is overtaken by at most
`server.OVERTAKE_MAX` later requests, however many cheap ones the client pipelines
behind it.

Counted, never timed: the client sends one worker-bound request and then thousands of
4 KiB reads of cached data (answered inline on the event loop) in one go, and the order
of the replies shows how many later requests were answered first. Before the bound, a
batch of pipelined requests ran inline to the end of what had arrived (thousands of
them) before the worker's completion could even be handled.
"""

from __future__ import annotations

import struct
import threading

import pytest

from nbdserver.protocol.constants import (
    NBD_CMD_FLAG_FUA,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
)
from nbdserver.server import INLINE_READ_MAX, OVERTAKE_MAX
from tests.helpers.nbdraw import RawClient

pytestmark = pytest.mark.timeout(120)
S = 4096
MiB = 1 << 20
READS = 4000
WORKER = 1  # the cookie of the worker-bound request; reads are 2..READS+1


def header(cmd, cookie, offset, length, flags=0) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# The first request goes to a worker whatever the cache holds: a FUA write (durable
# before its reply: never on the event loop) or a read above the inline limit.
FIRST = {
    "FUA write": (header(NBD_CMD_WRITE, WORKER, 4 * MiB, S, NBD_CMD_FLAG_FUA) + b"\x5a" * S, 0),
    "large read": (header(NBD_CMD_READ, WORKER, 8 * MiB, 2 * INLINE_READ_MAX), 2 * INLINE_READ_MAX),
}


@pytest.mark.parametrize("first", list(FIRST))
def test_worker_request_is_overtaken_by_a_bounded_number_of_later_ones(server, first):
    assert READS > 4 * OVERTAKE_MAX  # enough behind it that an unbounded stream would show
    request, first_len = FIRST[first]
    with RawClient.connected(server.address, "disk") as c:
        # Data in the page cache, so the reads are answered inline.
        c.request(NBD_CMD_WRITE, 0, MiB, cookie=7, payload=b"\xa5" * MiB)
        assert c.simple_reply()[:2] == (0, 7)
        burst = request + b"".join(header(NBD_CMD_READ, 2 + i, (i % 256) * S, S)
                                   for i in range(READS))
        # Sent from a thread while this one reads the replies: the server stops reading
        # while the client does not read its replies.
        sender = threading.Thread(target=c.send, args=(burst,))
        sender.start()
        order = []
        try:
            for _ in range(READS + 1):
                magic, err, cookie = struct.unpack(">IIQ", c.recv_exact(16))
                assert magic == NBD_SIMPLE_REPLY_MAGIC and err == 0, (magic, err, cookie)
                n = first_len if cookie == WORKER else S
                if n:
                    data = c.recv_exact(n)
                    if cookie != WORKER:
                        assert data == b"\xa5" * S
                order.append(cookie)
        finally:
            sender.join(30)
    assert sorted(order) == list(range(1, READS + 2))
    overtaken_by = order.index(WORKER)
    assert overtaken_by <= OVERTAKE_MAX, \
        f"{overtaken_by} later requests were answered before the worker's"
    server.assert_healthy()
