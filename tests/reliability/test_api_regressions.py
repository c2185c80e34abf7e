"""Regressions for what the schemathesis run (test_fuzz_keyservice_api.py) found in the
key service API, each pinned down with one exact request against the real daemon."""

from __future__ import annotations

import socket

import pytest

from tests.helpers.platform import Stack


@pytest.fixture(scope="module")
def ks(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("ks"))
    stack.start_keyservice()
    stack.keyservice("vault", "create", "regvault", "--location", "local", "--subscription", "s1",
                     "--enable-purge-protection")
    yield stack
    try:
        stack.ks.assert_healthy()
    finally:
        stack.close()


def test_import_with_null_pem_is_400_not_500(ks):
    """Found by schemathesis: `{"pem": null}` reached `.encode()` on None (500)."""
    status, body = ks.ks_api("PUT", "/vaults/regvault/keys/k1", {"pem": None})
    assert status == 400, body
    assert "pem" in body["error"]["message"]
    ks.ks.assert_healthy()


def test_malformed_http_is_400_without_a_traceback(ks):
    """Found by schemathesis: a NUL byte in a header value was answered 400 by aiohttp,
    which then logged the client's bad bytes as an ERROR with a traceback."""
    with socket.create_connection(("127.0.0.1", ks.ks.port), timeout=10) as s:
        s.sendall(b"GET /vaults HTTP/1.1\r\nHost: x\r\nX-Probe: \x00\r\n\r\n")
        reply = s.recv(4096)
    assert reply.split(b" ", 2)[1] == b"400", reply[:100]
    status, _ = ks.ks_api("GET", "/vaults")  # and the service is still there
    assert status == 200
    ks.ks.assert_healthy()  # no traceback in its log


def test_nbdserver_api_malformed_http_is_400_without_a_traceback(tmp_path):
    """The same aiohttp behaviour on the platform's API (found by probing it after the key
    service's fix): malformed requests answered 400 then logged with a traceback."""
    with Stack(tmp_path / "stack") as stack:
        host, port = stack.nb.api_address.rsplit(":", 1)
        for bad in (b"X-Probe: \x00\r\n", b"Content-Length: abc\r\n"):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"GET /disks HTTP/1.1\r\nHost: x\r\n" + bad + b"\r\n")
                reply = s.recv(4096)
            assert reply.split(b" ", 2)[1] == b"400", reply[:100]
        status, _ = stack.api("GET", "/disks")
        assert status == 200
        stack.assert_healthy()
