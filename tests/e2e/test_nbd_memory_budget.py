"""Memory held for clients that do not read their replies (issue 19, item 4).

Each connection stopped reading at 64 requests in flight, but 64 READs of 32 MiB are
2 GiB, and nothing bounded the sum over connections (three such clients: 6.8 GB of RSS).
Here three raw clients each send many 32 MiB READs and read nothing back; the server's
resident memory (/proc/PID/status of the real process) must stay within its buffer
budget plus the interpreter's own, and a well-behaved client must still be served.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserver.protocol.constants import NBD_CMD_READ
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.timeout(180)

BUDGET_MIB = 256
READ = 32 << 20
READS_PER_CLIENT = 24  # 768 MiB asked per client, 2.25 GiB in all: far over the budget
# The interpreter, uvloop, the worker threads' stacks and the socket's own buffers.
SLACK = 160 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_unread_replies_stay_within_the_budget(server_factory, tmp_path):
    img = tmp_path / "big.img"
    with open(img, "wb") as f:  # data, not holes: every READ reply is full size
        for i in range(64):
            f.write(bytes([i]) * (1 << 20))
    srv = server_factory([f"disk={img}"], extra_args=["--buffer-budget-mib", str(BUDGET_MIB)])
    base = rss(srv.pid)

    hogs = []
    peak = 0
    try:
        for _ in range(3):
            c = RawClient.connected(srv.address, "disk")
            for i in range(READS_PER_CLIENT):
                c.request(NBD_CMD_READ, 0, READ, cookie=i)
            hogs.append(c)
        # Let the server do all it will: wait until its memory stops growing.
        samples = []

        def settled():
            samples.append(rss(srv.pid))
            return len(samples) > 20 and max(samples[-20:]) - min(samples[-20:]) < (8 << 20)
        wait_until(settled, 60, interval=0.05, what="the server's memory to settle")
        peak = max(samples)
        assert peak - base < (BUDGET_MIB << 20) + SLACK, (peak - base) >> 20

        # Another client is still served meanwhile: the hogs hold at most their shares.
        h = nbd.NBD()
        h.connect_uri(srv.uri("disk"))
        assert h.pread(4096, 5 << 20) == bytes([5]) * 4096
        h.shutdown()
    finally:
        for c in hogs:
            c.close()
    # Their buffers come back once they are gone: a large READ is served again.
    h = nbd.NBD()
    h.connect_uri(srv.uri("disk"))
    assert h.pread(READ, 0)[:(1 << 20)] == bytes(1 << 20)
    h.shutdown()
    # And the memory goes back to the system (32 MiB buffers are mmapped: runtime.py).
    wait_until(lambda: rss(srv.pid) - base < (64 << 20), 30, interval=0.05,
               what="the server's memory to come back")
