"""Native sessions (server.Connection._start_session) seen from a test: record the
sessions a server in the test's process starts, and bring one about on a connection."""

from __future__ import annotations

import struct

from nbdserver import cachedio
from nbdserver.protocol.constants import NBD_CMD_READ, NBD_CMD_WRITE, NBD_REQUEST_MAGIC
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until

S = 4096


def request(cmd: int, offset: int, length: int, cookie: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def record_sessions(monkeypatch) -> list:
    """Every native session the server starts from now on, and what it returned
    (cachedio.Served fields), appended as each returns."""
    served: list = []
    real = cachedio._serve

    def serve(*args):
        done = real(*args)
        served.append(done)
        return done

    monkeypatch.setattr(cachedio, "_serve", serve)
    return served


def session_running(srv) -> bool:
    return srv.call(lambda: any(c._session is not None for c in srv.server.connections))


def start_session(srv, c: RawClient, data: bytes, *, offset: int = 0, structured: bool = False) -> None:
    """`data` (one sector) written at `offset` (the usual path makes the stripe lock),
    then read back: the fast path answers that chunk wholly, and a session takes the
    connection. The READ's reply is a chunk if the connection negotiated structured replies."""
    c.send(request(NBD_CMD_WRITE, offset, S, 1, data))
    assert c.simple_reply() == (0, 1, b"")  # a reply without data is simple either way
    c.send(request(NBD_CMD_READ, offset, S, 2))
    if structured:
        assert c.chunk() == (1, 1, 2, struct.pack(">Q", offset) + data)  # DONE, OFFSET_DATA
    else:
        assert c.simple_reply(S) == (0, 2, data)
    wait_until(lambda: session_running(srv), 10, what="a session")
