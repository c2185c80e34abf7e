"""Slowloris protection of both HTTP servers (issue 19, item 13): the key service's API
and nbdserver's platform API, each started as a real process.

The attack: 100 connections that each send part of a request and then nothing (or one
byte at a time) stayed open for good, and nothing capped how many could be open. Now a
request's headers must arrive within the header timeout and its body within the body
timeout (both set short here), and connections past the cap are answered 503.
"""
import select
import socket
import time
import urllib.request

import pytest

from tests.helpers.platform import Stack

TIMEOUT = 1.0  # the servers' header and body timeouts in these tests
CLOSE_DEADLINE = TIMEOUT + 9.0  # liveness: every partial request is closed by then
PARTIALS = 100


def partial_requests(port, n):
    """`n` connections in three flavours: half a request line, complete headers with a
    body that never comes, and a drip of one header byte at a time."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 3 == 0:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        elif i % 3 == 1:
            s.sendall(b"POST /vaults HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"na")
        else:
            s.sendall(b"G")
        socks.append(s)
    return socks


def closed(s: socket.socket) -> bool:
    """True once the server closed `s` (EOF or reset); drips a byte on the dripping ones."""
    if not select.select([s], [], [], 0)[0]:
        try:
            s.send(b"x")  # harmless on the others: more header or body bytes
        except OSError:
            return True
        return False
    try:
        return s.recv(4096) == b""
    except OSError:
        return True


def wait_all_closed(socks, deadline):
    end = time.monotonic() + deadline
    open_ = list(socks)
    while open_ and time.monotonic() < end:
        open_ = [s for s in open_ if not closed(s)]
        select.select(open_, [], [], 0.1)  # wake on the server's close, or pace the drip
    for s in socks:
        s.close()
    return len(open_)


def served(url) -> int:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status


def check_guarded(port, health_url):
    socks = partial_requests(port, PARTIALS)
    assert served(health_url) == 200  # a normal client is served meanwhile
    assert not any(closed(s) for s in socks[:5])  # the partial requests were held, not refused
    t0 = time.monotonic()
    left = wait_all_closed(socks, CLOSE_DEADLINE)
    assert left == 0, f"{left} of {PARTIALS} partial requests still open after {time.monotonic() - t0:.1f} s"
    assert served(health_url) == 200


def test_keyservice_closes_partial_requests_and_serves_others(make_daemon):
    d = make_daemon(extra_args=["--http-header-timeout", str(TIMEOUT),
                                "--http-body-timeout", str(TIMEOUT)])
    check_guarded(d.port, d.url + "/health")
    assert "not complete within" in d.stderr()


def test_keyservice_caps_connections(make_daemon):
    d = make_daemon(extra_args=["--max-connections", "20", "--http-header-timeout", "60"])
    held = []
    for _ in range(20):  # each served one request and stays open (keep-alive): counted
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        held.append(s)
    extra = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    answer = b""
    while chunk := extra.recv(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
    extra.close()
    held.pop().close()
    from tests.helpers.servers import wait_until
    wait_until(lambda: _health_ok(d.url + "/health"), timeout=10, what="a slot after one connection closed")
    for s in held:
        s.close()


def _health_ok(url) -> bool:
    try:
        return served(url) == 200
    except OSError:
        return False


@pytest.fixture
def platform_stack(tmp_path, monkeypatch):
    monkeypatch.setenv("NBDSERVER_API_HEADER_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("NBDSERVER_API_BODY_TIMEOUT", str(TIMEOUT))
    with Stack(tmp_path / "stack") as stack:  # started by `with`
        yield stack


def test_platform_api_closes_partial_requests_and_serves_others(platform_stack):
    port = int(platform_stack.nb.api_address.rsplit(":", 1)[1])
    check_guarded(port, platform_stack.nb.api_url + "/healthz")
