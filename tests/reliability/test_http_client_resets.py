"""HTTP clients that vanish mid-request (killed, reset, cut off by the slow-request
guard) are no fault of the server's: no 500, no traceback in its log, and the next
client is served. Found by killing `nbdserver serve` in the middle of its key-service
calls: the key service logged a ConnectionResetError traceback as an internal error."""

from __future__ import annotations

import json
import socket
import struct

from tests.helpers.platform import Stack


def _reset_mid_body(port: int, head: bytes, body: bytes, n: int) -> None:
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head + body[: (i % 3) * len(body) // 3])  # headers, then part of the body
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        s.close()


def test_clients_that_reset_mid_request_leave_no_trace(tmp_path):
    with Stack(tmp_path) as stack:
        cred = json.loads(stack.ks.admin_credential.read_text())
        body = (f"grant_type=client_credentials&client_id={cred['client_id']}"
                f"&client_secret={cred['client_secret']}").encode()
        head = ("POST /oauth2/token HTTP/1.1\r\nHost: ks\r\nContent-Type: "
                f"application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        _reset_mid_body(stack.ks.port, head, body, 300)

        token = stack.nb.token_file.read_text().strip()
        body = json.dumps({"name": "never", "size": "1M"}).encode()
        head = (f"POST /disks HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        api_port = int(stack.nb.api_address.rsplit(":", 1)[1])
        _reset_mid_body(api_port, head, body, 300)

        # Both still answer, and neither logged a traceback (checked by assert_healthy).
        stack.create_disk("after-resets", "--size", "1M")
        assert stack.keyservice("vault", "list")["value"] is not None
        stack.assert_healthy()
