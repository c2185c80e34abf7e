"""Connection floods (issue 19, item 3): idle sockets must not exhaust the server.

Before the limits, every TCP connection was kept for as long as the peer liked: about
20,000 idle sockets took every file descriptor, and the platform could no longer reach
the key service to learn that a key was revoked. Each test here performs that flood at
a small scale against the real server process and checks that the server stays
reachable for the clients the flood did not come from, or once the flood ends.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

import pytest

from nbdserver.protocol.constants import IHAVEOPT, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_OPT_GO
from tests.helpers.images import DISK_SIZE
from tests.helpers.servers import BaselineServer, stop_healthy, wait_until

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.timeout(120)

CAP = 20
GREETING = 18


def open_idle(address, n: int, source: str | None = None) -> list[socket.socket]:
    """n connections that read the greeting and then say nothing (the attack)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=15,
                                     source_address=(source, 0) if source else None)
        socks.append(s)
    return socks


def greeted(s: socket.socket) -> bool:
    """True if the server sent its greeting; False if it closed the connection first."""
    data = b""
    try:
        while len(data) < GREETING:
            chunk = s.recv(GREETING - len(data))
            if not chunk:
                return False
            data += chunk
    except ConnectionResetError:
        return False
    return True


def closed_by_server(s: socket.socket) -> bool:
    """Waits (up to the socket's timeout) for EOF or reset; False on timeout."""
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def client_reads(srv) -> bytes:
    h = nbd.NBD()
    h.connect_uri(srv.uri("disk"))
    data = h.pread(4096, 0)
    h.shutdown()
    return data


def connects(srv) -> bool:
    try:
        client_reads(srv)
        return True
    except nbd.Error:
        return False


def close_all(socks):
    for s in socks:
        s.close()


@pytest.fixture
def disk(tmp_path):
    return f"disk={tmp_path / 'disk.img'},size={DISK_SIZE}"


def test_connections_over_the_per_peer_cap_are_closed_and_room_returns(server_factory, disk):
    srv = server_factory([disk], extra_args=["--max-connections-per-peer", str(CAP),
                                             "--handshake-timeout", "600"])
    flood = open_idle(srv.address, CAP)
    try:
        assert all(greeted(s) for s in flood)
        extra = open_idle(srv.address, 3)
        # Over the cap: accepted and closed at once, before any greeting.
        assert not any(greeted(s) for s in extra)
        close_all(extra)
        assert not connects(srv)
        assert "refused" in srv.stderr_text() and f"{CAP} connections open from 127.0.0.1" \
            in srv.stderr_text()
    finally:
        close_all(flood)
    # The flood gone, clients are served again (the server counts the closes as they
    # reach it, hence a deadline rather than at once).
    assert wait_until(lambda: connects(srv), 20, interval=0.1, what="a client to connect again")
    # The refusals are logged at a bounded rate, not one line per attempt.
    assert srv.stderr_text().count("refused:") < 3


def test_a_flood_from_one_peer_leaves_other_peers_served(server_factory, disk):
    srv = server_factory([disk], extra_args=["--max-connections-per-peer", str(CAP),
                                             "--handshake-timeout", "600"])
    flood = open_idle(srv.address, CAP + 5, source="127.0.0.2")
    try:
        admitted = [greeted(s) for s in flood]
        assert admitted.count(True) == CAP, admitted
        # The attacker's address is full; another address still gets in, with libnbd,
        # and more than one connection of it (multi-conn).
        handles = []
        for _ in range(3):
            h = nbd.NBD()
            h.connect_uri(srv.uri("disk"))
            handles.append(h)
        for h in handles:
            assert h.pread(4096, 0) == bytes(4096)
            h.shutdown()
        late = open_idle(srv.address, 1, source="127.0.0.2")
        assert not greeted(late[0])
        close_all(late)
    finally:
        close_all(flood)


def test_unfinished_handshakes_are_closed_after_the_timeout(server_factory, disk):
    srv = server_factory([disk], extra_args=["--handshake-timeout", "1"])
    silent, = open_idle(srv.address, 1)
    partial, = open_idle(srv.address, 1)
    attached = nbd.NBD()
    attached.connect_uri(srv.uri("disk"))  # reaches transmission: no deadline after that
    try:
        assert greeted(silent) and greeted(partial)
        # Client flags, then half an NBD_OPT_GO, then nothing.
        partial.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE)
                        + struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, 64) + b"\0" * 10)
        assert closed_by_server(silent), "a silent connection was kept past the timeout"
        assert closed_by_server(partial), "a half-done handshake was kept past the timeout"
        assert attached.pread(4096, 0) == bytes(4096)
        assert "handshake not finished after 1 s" in srv.stderr_text()
    finally:
        silent.close()
        partial.close()
        attached.shutdown()
    assert connects(srv)


def test_a_tls_handshake_that_never_ends_is_closed(tls_pki_server):
    """STARTTLS accepted, then no ClientHello: the TLS handshake is under the deadline too."""
    srv = tls_pki_server
    s, = open_idle(srv.address, 1)
    try:
        assert greeted(s)
        s.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE) + struct.pack(">QII", IHAVEOPT, 5, 0))
        assert closed_by_server(s), "a stalled TLS handshake was kept past the timeout"
    finally:
        s.close()
    assert "TLS handshake failed" in srv.stderr_text() or "handshake not finished" in srv.stderr_text()


@pytest.fixture
def tls_pki_server(tmp_path):
    from daemonkit.tlsca import init_ca
    certs = tmp_path / "pki"
    init_ca(certs)
    srv = BaselineServer(tmp_path, [f"disk={tmp_path / 'disk.img'},size={DISK_SIZE}"],
                         extra_args=["--tls-mode", "required", "--tls-dir", str(certs),
                                     "--handshake-timeout", "1"], name="tlsflood").start()
    yield srv
    stop_healthy([srv])


def test_total_cap_keeps_descriptors_in_reserve(tmp_path, disk):
    """Started with a soft descriptor limit of 300 under a hard one of 400: the server
    raises the soft limit to 400 and takes at most 400 - 256 (the reserve) connections,
    so a flood can never take the descriptors the daemon needs for itself."""
    srv = BaselineServer(tmp_path, [disk], extra_args=["--handshake-timeout", "600"])
    srv.argv = ["prlimit", "--nofile=300:400", "--", *srv.argv]
    srv.start()
    flood = []
    try:
        limits = Path(f"/proc/{srv.pid}/limits").read_text()
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
        assert line.split()[3:5] == ["400", "400"], line
        flood = open_idle(srv.address, 170)
        admitted = [greeted(s) for s in flood]
        assert admitted.count(True) == 400 - 256, admitted.count(True)
        assert len(list(Path(f"/proc/{srv.pid}/fd").iterdir())) <= 400 - 200
        assert "taking at most 144 NBD connections" in srv.stderr_text()
        close_all(flood)
        assert wait_until(lambda: connects(srv), 20, interval=0.1, what="a client to connect again")
    finally:
        close_all(flood)
        stop_healthy([srv])


def test_limits_are_checked_on_the_command_line(tmp_path, disk):
    import subprocess
    r = subprocess.run([sys.executable, "-m", "nbdserver.baseline", "--listen", "127.0.0.1:0",
                        "--handshake-timeout", "0", disk], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "handshake timeout must be positive" in r.stderr, r.stderr
