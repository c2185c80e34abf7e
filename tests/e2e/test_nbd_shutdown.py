"""SIGTERM is a clean shutdown: requests already received complete, then the process exits 0."""

from __future__ import annotations

import errno
import os
import struct

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

from nbdserver.protocol.constants import NBD_CMD_READ, NBD_REQUEST_MAGIC  # noqa: E402
from tests.helpers.images import ro_pattern  # noqa: E402
from tests.helpers.nbdraw import RawClient  # noqa: E402
from tests.helpers.servers import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def test_requests_in_flight_complete_then_exit_0(server):
    reads = [(i, (i % 12) * MiB, 4 * MiB) for i in range(16)]
    with RawClient.connected(server.address, "ro") as c:
        # One send: the server parses all 16 from one read, and large reads run on its
        # workers, so they are in flight together.
        c.send(b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, cookie, off, n)
                        for cookie, off, n in reads))
        first = c.simple_reply(4 * MiB)  # the server is certainly serving them now
        server.proc.terminate()
        replies = {first[1]: first}
        for _ in range(len(reads) - 1):
            err, cookie, data = c.simple_reply(4 * MiB)
            replies[cookie] = (err, cookie, data)
        for cookie, off, n in reads:
            err, _, data = replies[cookie]
            assert err == 0 and data == ro_pattern(off, n), f"request {cookie}"
        assert c.closed_by_server()
    assert server.proc.wait(timeout=30) == 0
    assert "Traceback" not in server.stderr_text()


def test_sigterm_under_libnbd_load(server, tmp_path):
    h = nbd.NBD()
    h.connect_uri(server.uri("disk"))
    chunk = 256 * 1024
    payloads = [os.urandom(chunk) for _ in range(64)]
    cookies = {h.aio_pwrite(p, i * chunk, flags=nbd.CMD_FLAG_FUA): i for i, p in enumerate(payloads)}

    def some_completed():
        h.poll(100)
        return h.aio_peek_command_completed() != 0
    wait_until(some_completed, 30, what="a write to complete")
    server.proc.terminate()
    ok, refused = set(), 0
    while cookies:
        for cookie in list(cookies):
            try:
                if not h.aio_command_completed(cookie):
                    continue
                ok.add(cookies.pop(cookie))
            except nbd.Error as e:
                # Requests the server had not yet read when it stopped: ESHUTDOWN, or the
                # connection closed under them.
                assert e.errnum in (errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET,
                                    errno.EPIPE), e
                cookies.pop(cookie)
                refused += 1
        if cookies and h.aio_in_flight():
            try:
                h.poll(1000)
            except nbd.Error:
                pass  # the server closed: libnbd fails what is left
    assert server.proc.wait(timeout=30) == 0
    assert "Traceback" not in server.stderr_text()
    assert ok, "the writes in flight at SIGTERM must have completed"
    with open(tmp_path / "disk.img", "rb") as f:
        for i in ok:
            f.seek(i * chunk)
            assert f.read(chunk) == payloads[i], f"acknowledged write {i} is not on disk"
