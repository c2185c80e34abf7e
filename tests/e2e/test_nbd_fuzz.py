"""Mutated NBD sessions over sockets: whatever a client sends, the server process survives,
logs no traceback, and keeps serving a well-behaved client.

Each session is a valid client transcript (handshake options, then requests), mutated
(bit flips, byte changes, insertions, deletions, truncation, spliced random bytes) and
sent whole; the client then half-closes and reads until the server closes. A seeded
generator keeps every run the same; `--slow` runs many more sessions.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

from nbdserver.protocol.constants import (  # noqa: E402
    IHAVEOPT,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REQUEST_MAGIC,
)
from tests.helpers.mutate import mutate  # noqa: E402

SIZE = 4 << 20


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def string(s: bytes) -> bytes:
    return struct.pack(">I", len(s)) + s


def req(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def transcript(rng: random.Random) -> bytes:
    """A valid client side of one session."""
    out = [struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if rng.random() < .5 else 0))]
    if rng.random() < .3:
        out.append(opt(NBD_OPT_LIST))
    if rng.random() < .3:
        out.append(opt(NBD_OPT_INFO, string(b"fuzz") + struct.pack(">HH", 1, 3)))
    if rng.random() < .3:
        out.append(opt(NBD_OPT_LIST_META_CONTEXT, string(b"fuzz") + struct.pack(">I", 1) + string(b"base:")))
    if rng.random() < .7:
        out.append(opt(NBD_OPT_STRUCTURED_REPLY))
        out.append(opt(NBD_OPT_SET_META_CONTEXT,
                       string(b"fuzz") + struct.pack(">I", 1) + string(b"base:allocation")))
    if rng.random() < .2:
        out.append(opt(NBD_OPT_EXPORT_NAME, b"fuzz"))
    else:
        out.append(opt(NBD_OPT_GO, string(b"fuzz") + struct.pack(">H", 0)))
    for cookie in range(rng.randint(1, 8)):
        off = rng.randrange(0, SIZE // 512) * 512
        n = rng.randint(1, 64) * 512
        cmd = rng.choice([NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_CACHE,
                          NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS])
        payload = rng.randbytes(n) if cmd == NBD_CMD_WRITE else b""
        out.append(req(cmd, off, n, rng.choice([0, 0, 1, 2, 8, 16]), cookie, payload))
    out.append(req(NBD_CMD_DISC, 0, 0))
    return b"".join(out)


def session(address, data: bytes) -> None:
    with socket.create_connection(address, timeout=30) as s:
        assert len(s.recv(18, socket.MSG_WAITALL)) == 18  # the greeting
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server already hung up on us: fine
        try:
            while s.recv(1 << 20):  # replies, until the server closes
                pass
        except ConnectionResetError:
            pass
        # socket.timeout escapes: a server that never closes a finished session is a bug.


def run_sessions(server, count: int, seed: int) -> None:
    rng = random.Random(seed)
    good = nbd.NBD()
    good.connect_uri(server.uri("fuzz"))
    marker = b"well-behaved" * 42 + bytes(8)
    try:
        for i in range(count):
            data = transcript(rng)
            session(server.address, mutate(rng, data) if i % 10 else data)
            if i % 50 == 49:
                server.assert_healthy()
                good.pwrite(marker, SIZE - 512)
                assert good.pread(512, SIZE - 512) == marker
    finally:
        good.shutdown()
    server.assert_healthy()
    fresh = nbd.NBD()
    fresh.connect_uri(server.uri("fuzz"))
    assert fresh.pread(512, SIZE - 512) == marker
    fresh.shutdown()


@pytest.fixture
def fuzz_server(server_factory, tmp_path):
    return server_factory([f"fuzz={tmp_path / 'fuzz.img'},size={SIZE}"])


@pytest.mark.timeout(180)
def test_mutated_sessions_do_not_hurt_the_server(fuzz_server):
    run_sessions(fuzz_server, 300, seed=20261128)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_mutated_sessions_soak(fuzz_server):
    run_sessions(fuzz_server, 20000, seed=random.SystemRandom().randrange(1 << 32))
