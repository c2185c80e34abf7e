"""Hostile and broken clients against the real server: one that never reads its replies,
ones that vanish in the middle of a request. The server must keep its memory bounded,
keep serving everyone else, and leak nothing (file descriptors come back).

Regression: before the fix "server: apply the in-flight and write-buffer limits per
request", one received chunk of 4000 READ headers started 4000 reads of 1 MiB at once and
the server grew past 2 GiB for a client that read nothing.
"""

from __future__ import annotations

import os
import socket
import struct

import nbd

from nbdserver.protocol.constants import NBD_CMD_READ, NBD_CMD_WRITE, NBD_REQUEST_MAGIC
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until
from tests.reliability.conftest import rss_kib

MiB = 1 << 20
# 64 in flight x 1 MiB + an 8 MiB write buffer + the interpreter: 256 MiB of growth is
# far above what the limits allow and far below what 4000 unbounded reads take (4 GiB).
RSS_GROWTH_LIMIT_KIB = 256 * 1024


def read_header(cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, cookie, offset, length)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_client_that_stops_reading_replies(server_factory, tmp_path):
    srv = server_factory([f"a={tmp_path / 'a.img'},size=64M", f"b={tmp_path / 'b.img'},size=64M"])
    before = rss_kib(srv.pid)
    hog = RawClient.connected(srv.address, "a")
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.sock.setblocking(False)
    burst = b"".join(read_header(i, (i % 64) * MiB, MiB) for i in range(4000))
    sent = 0
    try:  # as much as the server takes: it must stop reading, not start everything
        while sent < len(burst):
            sent += hog.sock.send(burst[sent:sent + 65536])
    except BlockingIOError:
        pass
    # The server read what it could; another client on another export and on the same
    # export is served while the hog sits there, and memory stays bounded.
    for name in ("b", "a"):
        h = nbd.NBD()
        h.connect_uri(srv.uri(name))
        for i in range(50):
            h.pwrite(bytes([i]) * 65536, i * 65536, nbd.CMD_FLAG_FUA)
            assert h.pread(65536, i * 65536) == bytes([i]) * 65536
        h.shutdown()
    growth = rss_kib(srv.pid) - before
    assert growth < RSS_GROWTH_LIMIT_KIB, f"server grew by {growth} KiB for a client that reads nothing"
    hog.close()
    srv.assert_healthy()


def test_clients_that_disconnect_mid_request(server_factory, tmp_path):
    srv = server_factory([f"a={tmp_path / 'a.img'},size=64M"])
    wait_until(lambda: fd_count(srv.pid) > 0, what="server fds")
    fds_before = fd_count(srv.pid)
    for i in range(30):
        c = RawClient.connected(srv.address, "a", structured=bool(i % 2))
        kind = i % 3
        if kind == 0:  # a WRITE header and half of its payload
            c.send(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 1, 0, 65536)
                   + b"x" * 30000)
        elif kind == 1:  # half of a request header
            c.send(read_header(1, 0, 4096)[:13])
        else:  # many big reads, gone before the replies
            c.send(b"".join(read_header(j, j * MiB, MiB) for j in range(40)))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST: the server's next write fails
    h = nbd.NBD()
    h.connect_uri(srv.uri("a"))
    h.pwrite(b"ok" * 2048, 0)
    assert h.pread(4096, 0) == b"ok" * 2048
    h.shutdown()
    # Every connection's socket is released (a condition, not a sleep).
    wait_until(lambda: fd_count(srv.pid) <= fds_before, 10, what="connection fds released")
    srv.assert_healthy()
