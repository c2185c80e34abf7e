"""Across hosts: the key service, the NBD server and a client each in its own network
namespace (tests/host/netlab.py), talking over a bridge with their own addresses.

- end to end: the reference workflow driven from the client host, a client writing and
  reading over NBD, the key disabled (EIO) and enabled (the same connection serves again);
- partition: the key service's cable pulled while the client writes. The NBD server keeps
  serving through the grace period, locks the disk when it ends (EIO), and serves again
  once the cable is back; every acknowledged write reads back.

As on real hosts, everything that crosses the network is TLS: the key service over HTTPS
(`keyservice tls init`), NBD over TLS (`nbdserver tls init`), both certificates naming the
hosts' addresses; the NBD client checks the server's certificate against its CA.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from tests.helpers.platform import KeyServiceProcess, NbdServerProcess, Stack
from tests.helpers.servers import ROOT
from tests.host.hostutil import require_root, require_tools
from tests.host.netlab import TestNetwork

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]
KS_PORT, NBD_PORT, API_PORT = 8443, 10809, 8080
LEASE, GRACE = 1.0, 4.0
DEADLINE = 60.0


class NetStack(Stack):
    """`Stack` with each daemon on its own host, over TLS, and the CLIs run on the client host."""

    def __init__(self, workdir, net: TestNetwork, **kw):
        super().__init__(workdir, **kw)
        self.net = net
        self.ks_tls = self.workdir / "ks-tls"
        self.nbd_tls = self.workdir / "nbd-tls"
        for cli, d, host in (("keyservice", self.ks_tls, "ks"), ("nbdserver.cli", self.nbd_tls, "srv")):
            subprocess.run([sys.executable, "-m", cli, "tls", "init", str(d), "--host",
                            net.addr(host)], check=True, capture_output=True, cwd=ROOT)

    def start_keyservice(self):
        ks = KeyServiceProcess(self.workdir, self.ks_dir, KS_PORT, self.ks_args)
        addr = self.net.addr("ks")
        ks.url = f"https://{addr}:{KS_PORT}"
        ks.argv[ks.argv.index("--listen") + 1] = f"{addr}:{KS_PORT}"
        ks.argv = self.net.argv("ks", ks.argv + ["--base-url", ks.url, "--tls-dir", self.ks_tls])
        self.ks = ks
        return ks.start()

    def start_nbdserver(self, **_):
        nb = NbdServerProcess(self.workdir, self.nb_dir, self.ks, lease=self.lease, grace=self.grace)
        addr = self.net.addr("srv")
        nb.argv[nb.argv.index("--nbd-listen") + 1] = f"{addr}:{NBD_PORT}"
        nb.argv[nb.argv.index("--api-listen") + 1] = f"{addr}:{API_PORT}"
        # Off loopback the management API is HTTPS (plain HTTP would carry its token in clear).
        nb.argv = self.net.argv("srv", nb.argv + [
            "--tls-dir", self.nbd_tls, "--keyservice-ca", self.ks_tls / "ca-cert.pem",
            "--api-tls-dir", self.nbd_tls])
        self.nb = nb.start()
        self.nb.api_url = f"https://{self.nb.api_address}"
        return self.nb

    @property
    def env(self) -> dict:
        return dict(super().env, KEYSERVICE_CA=str(self.ks_tls / "ca-cert.pem"),
                    NBDSERVER_CA=str(self.nbd_tls / "ca-cert.pem"))

    def keyservice(self, *args, check: bool = True, credential=None):
        return self._cli(self.net.argv("cli", [sys.executable, "-m", "keyservice", *args]),
                         self.env, check)

    def nbdserver(self, *args, check: bool = True):
        return self._cli(self.net.argv("cli", [sys.executable, "-m", "nbdserver.cli", *args]),
                         self.env, check)

    def serving_state(self, name: str) -> str:
        return self.nbdserver("disk", "show", name)["serving"]["state"]

    def client(self, disk: str) -> Client:
        return Client(self.net, f"nbds://{self._running_nb().nbd_address}/{disk}", self.nbd_tls)


class Client:
    """ns_writer.py on the client host; its report lines, read with deadlines."""

    def __init__(self, net: TestNetwork, uri: str, tls_dir):
        self.proc = subprocess.Popen(
            net.argv("cli", [sys.executable, ROOT / "tests/host/ns_writer.py", uri, tls_dir]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr  # all three are pipes
        self.stdin, self.stdout, self.stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self.lines: list[str] = []
        self._buf, self._pending = "", list[str]()
        self.expect("READY")

    def expect(self, prefix: str, timeout: float = DEADLINE) -> str:
        """The next report line starting with PREFIX (earlier lines are kept in .lines)."""
        deadline = time.monotonic() + timeout
        while True:
            while self._pending:
                line = self._pending.pop(0)
                self.lines.append(line)
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.stdout], [], [], max(0.0, left))
            if not r:
                raise AssertionError(f"no {prefix!r} from the client in {timeout}s; "
                                     f"saw {self.lines[-10:]}")
            chunk = os.read(self.stdout.fileno(), 65536).decode()
            if not chunk:
                raise AssertionError(f"client exited: {self.stderr.read()}")
            self._buf += chunk
            *done, self._buf = self._buf.split("\n")
            self._pending += [d.strip() for d in done]

    def ok_count(self) -> int:
        return int(self.expect("OK ").split()[1])

    def verify(self) -> None:
        self.stdin.write("VERIFY\n")
        self.stdin.flush()
        line = self.expect("VERIFIED")
        assert int(line.split()[1]) > 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stdout.close()
        self.stderr.close()


@pytest.fixture(scope="module")
def net():
    require_root()
    require_tools("ip")
    with TestNetwork(["ks", "srv", "cli"]) as n:
        yield n


@pytest.fixture(scope="module")
def stack(net, tmp_path_factory):
    with NetStack(tmp_path_factory.mktemp("netstack"), net, lease=LEASE, grace=GRACE) as s:
        s.customer_key("cust", "k1", "des1")
        s.create_disk("d1", "--size", "16M", "--des", "des1")
        yield s


def test_hosts_reach_each_other_only_through_the_network(net, stack):
    assert stack.ks_url == f"https://{net.addr('ks')}:{KS_PORT}"
    assert stack.nb.nbd_address == f"{net.addr('srv')}:{NBD_PORT}"
    assert stack.nbdserver("disk", "show", "d1")["encryption"]["kid"].startswith(stack.ks_url)
    # The client host has its own loopback: nothing of the daemons listens there.
    r = net.run("cli", [sys.executable, "-c", "import socket; socket.create_connection"
                        f"(('127.0.0.1', {NBD_PORT}), 2)"])
    assert r.returncode != 0 and "Connection refused" in r.stderr


def test_across_hosts_revoke_and_restore(net, stack):
    c = stack.client("d1")
    try:
        c.ok_count()
        stack.keyservice("key", "disable", "cust", "k1")
        assert c.expect("ERR").split()[1] == "EIO"
        assert stack.serving_state("d1") == "locked"
        stack.keyservice("key", "enable", "cust", "k1")
        c.expect("RECOVERED")
        c.ok_count()
        c.verify()
    finally:
        c.close()
    stack.assert_healthy()


def test_partition_grace_then_lock_then_recovery(net, stack):
    stack.wait_serving("d1", "available", timeout=DEADLINE)
    c = stack.client("d1")
    try:
        c.ok_count()
        net.set_link("ks", up=False)
        # Within the grace period the disk keeps serving: writes go on being acknowledged.
        before = c.ok_count()
        assert c.ok_count() > before and not [ln for ln in c.lines if ln.startswith("ERR")]
        # The grace period ends without a successful check: the disk locks.
        assert c.expect("ERR").split()[1] == "EIO"
        state = stack.nbdserver("disk", "show", "d1")["serving"]
        assert state["state"] == "locked" and "grace period" in state["reason"], state
        net.set_link("ks", up=True)
        c.expect("RECOVERED")
        c.ok_count()
        c.verify()
    finally:
        net.set_link("ks", up=True)
        c.close()
    stack.wait_serving("d1", "available", timeout=DEADLINE)
    stack.assert_healthy()
