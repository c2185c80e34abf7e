"""Revocation under a connection flood (issue 19, item 3).

The attack: idle TCP connections to the NBD port until the server has no descriptor
left; the platform then cannot reach the key service, and a server that took that for
"key service unreachable" kept serving a revoked disk for the whole grace period. Here
the server runs with a small descriptor limit (1024, from its start), the attacker
opens more connections than that from several addresses and holds them, and the owner
disables the key: the attached disk must fail I/O within the usual second.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.helpers.platform import NbdServerProcess, Stack, wait_for_eio, wait_for_io
from tests.helpers.servers import wait_until

NOFILE = 1024
ATTACKERS = [f"127.0.0.{i}" for i in range(2, 6)]
PER_ATTACKER = 400  # 1,600 in all: more than the server has descriptors


def _flood(host: str, port: int) -> list[socket.socket]:
    socks = []
    for src in ATTACKERS:
        for _ in range(PER_ATTACKER):
            s = socket.socket()
            s.bind((src, 0))
            s.setblocking(False)
            try:
                s.connect((host, port))
            except BlockingIOError:
                pass
            socks.append(s)
    return socks


def _server_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def small_stack(tmp_path):
    stack = Stack(tmp_path, nbd_args=["--handshake-timeout", "120"])
    stack.start_keyservice()
    # The NBD server alone runs with the small limit (util-linux's prlimit); a long
    # handshake timeout keeps the attacker's idle sockets for the whole test.
    nb = NbdServerProcess(stack.workdir, stack.nb_dir, stack.ks, lease=stack.lease,
                          grace=stack.grace, extra_args=stack.nbd_args)
    nb.argv = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", *nb.argv]
    stack.nb = nb.start()
    yield stack
    stack.close()


def test_a_connection_flood_does_not_hold_off_revocation(small_stack):
    stack = small_stack
    c = stack.customer_key("floodv", "k1", "des-flood")
    stack.create_disk("flooded", "--size", "16M", "--des", c["des"])
    h = stack.connect("flooded")
    h.pwrite(b"f" * 4096, 0)
    host, port = stack.nb.nbd_address.rsplit(":", 1)
    socks = _flood(host, int(port))
    try:
        # The server took what it would take and no more: descriptors stay below the limit.
        wait_until(lambda: _server_fds(stack.nb.pid) >= NOFILE - 300, 30, interval=0.1,
                   what="the flood to fill the server's connection cap")
        assert _server_fds(stack.nb.pid) < NOFILE - 64, "the descriptor reserve was taken"
        assert h.pread(4096, 0) == b"f" * 4096  # an attached client still works

        stack.keyservice("key", "disable", "floodv", "k1")
        t0 = time.monotonic()
        wait_for_eio(h, timeout=1.0)
        locked_after = time.monotonic() - t0
        assert stack.disk("flooded")["serving"]["state"] == "locked"
        print(f"\nlocked {locked_after * 1000:.0f} ms after the disable, "
              f"{_server_fds(stack.nb.pid)} server descriptors in use")

        # And access comes back while the flood goes on.
        stack.keyservice("key", "enable", "floodv", "k1")
        wait_for_io(h, timeout=5.0)
    finally:
        for s in socks:
            s.close()
        h.shutdown()
    stack.assert_healthy()
