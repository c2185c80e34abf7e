"""Random and mutated request streams sent to connections a native session serves
(nbdserver/_cachedio.c `serve`, started by server.Connection._start_session).

The session parses what the client sends in C, so it gets the same treatment as the
Python parser (tests/e2e/test_nbd_fuzz.py, tests/reliability/test_fuzz_protocol.py),
which never reaches it: those send the handshake and the requests in one piece, and a
session starts only on a connection whose last received chunk the fast path answered.
Here each connection first has a session, then gets the stream in pieces:
- valid pipelined streams (aligned and unaligned READs and WRITEs, large READs, FLUSH)
  must get exactly one correct reply per request, the data a model of the disk says;
- mutated streams must leave the server whole: no traceback, nothing in flight, the
  buffer budget back to zero, and a well-behaved client served throughout.

The server runs in this process (tests/helpers/inproc.py), so a crash in the C code
fails the run, and the test can see the sessions it started. A seeded generator keeps
every run the same; `--slow` runs many more streams with a random seed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
import struct
import threading

import pytest

from nbdserver.backend import FileBackend
from nbdserver.crypto import XtsLayer, generate_dek
from nbdserver.exports import Export, ExportCatalog
from nbdserver.protocol.constants import (
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
)
from tests.helpers.inproc import ServerThread
from tests.helpers.mutate import mutate
from tests.helpers.nbdraw import RawClient
from tests.helpers.servers import wait_until
from tests.helpers.sessions import record_sessions, request, start_session

S = 4096
SECTORS = 512
SIZE = SECTORS * S
REPLY_TYPE_OFFSET_DATA = 1
REPLY_FLAG_DONE = 1


@pytest.fixture
def sessions(monkeypatch):
    return record_sessions(monkeypatch)


@pytest.fixture
def disk(tmp_path):
    """An encrypted disk wholly written (so in the page cache), in a server in this
    process; its plaintext as a model."""
    backend = XtsLayer(FileBackend(tmp_path / "d.img", size=SIZE), generate_dek())
    model = bytearray(os.urandom(SIZE))
    backend.pwrite(memoryview(bytearray(model)), 0)
    export = Export("d", backend)
    catalog = ExportCatalog()
    catalog.add(export)
    with ServerThread(asyncio.new_event_loop, catalog) as srv:
        yield srv, export, model
    backend.close()


def stream(rng: random.Random, model: bytearray, first_cookie: int):
    """A valid pipelined stream: its bytes, {cookie: (command, offset, length)}, and the
    writes to apply to the model once it is answered. No sector is both written and read,
    or written twice, in one stream, as NBD does not order requests in flight."""
    out, asked, writes = [], {}, []
    busy: set[int] = set()
    for cookie in range(first_cookie, first_cookie + rng.randint(4, 48)):
        kind = rng.random()
        if kind < .05:
            out.append(request(NBD_CMD_FLUSH, 0, 0, cookie))
            asked[cookie] = (NBD_CMD_FLUSH, 0, 0)
            continue
        sectors = rng.choice([1, 1, 1, 2, 4]) if kind > .1 else 32  # 128 KiB: not inline
        first = rng.randrange(SECTORS - sectors + 1)
        span = set(range(first, first + sectors))
        if span & busy:
            continue
        busy |= span
        offset, length = first * S, sectors * S
        if rng.random() < .1:  # a part of a sector: read-modify-write on the loop's path
            offset += rng.randrange(8) * 512
            length = 512 * rng.randint(1, (first * S + sectors * S - offset) // 512)
        if kind < .55 and sectors < 32:
            data = rng.randbytes(length)
            out.append(request(NBD_CMD_WRITE, offset, length, cookie, data))
            asked[cookie] = (NBD_CMD_WRITE, offset, length)
            writes.append((offset, data))
        else:
            out.append(request(NBD_CMD_READ, offset, length, cookie))
            asked[cookie] = (NBD_CMD_READ, offset, length)
    return b"".join(out), asked, writes


def send_in_pieces(rng: random.Random, sock: socket.socket, data: bytes) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 5, 28, 100, 4096, 5000, 65536])
        sock.sendall(data[pos:pos + n])
        pos += n


def replies(c: RawClient, asked: dict, structured: bool) -> dict:
    """Every reply to the requests `asked`: {cookie: (error, data)}. A cookie answered
    twice, or one never asked, fails; so does a structured READ reply in more than one
    chunk (holes are not scanned below 64 KiB, and these disks have none)."""
    got: dict = {}
    while len(got) < len(asked):
        magic = struct.unpack(">I", c.recv_exact(4))[0]
        if magic == NBD_STRUCTURED_REPLY_MAGIC and structured:
            flags, ctype, cookie, length = struct.unpack(">HHQI", c.recv_exact(16))
            assert flags == REPLY_FLAG_DONE, "one chunk per reply: each READ fits one"
            payload = c.recv_exact(length)
            assert ctype == REPLY_TYPE_OFFSET_DATA, f"chunk type {ctype:#x}: {payload!r}"
            assert struct.unpack(">Q", payload[:8])[0] == asked[cookie][1]
            error, data = 0, payload[8:]
        else:  # a reply without data is simple either way
            assert magic == NBD_SIMPLE_REPLY_MAGIC, f"bad magic {magic:#x}"
            error, cookie = struct.unpack(">IQ", c.recv_exact(12))
            cmd, _, length = asked[cookie]
            data = c.recv_exact(length) if cmd == NBD_CMD_READ and not error else b""
        assert cookie in asked and cookie not in got, f"cookie {cookie} unasked or answered twice"
        got[cookie] = (error, data)
    return got


def settled(srv, export) -> bool:
    """Every connection gone, nothing in flight, no session, the buffer budget whole."""
    server = srv.server
    return srv.call(lambda: not server.connections and export.inflight == 0
                    and server.sessions == 0 and server.budget.used == 0)


def pipelined_streams(srv, export, model, sessions, count: int, seed: int) -> None:
    rng = random.Random(seed)
    served = 0
    for i in range(count):
        structured = bool(i % 2)
        with RawClient.connected(srv.address, "d", structured=structured) as c:
            at = rng.randrange(SECTORS) * S
            data = rng.randbytes(S)
            start_session(srv, c, data, offset=at, structured=structured)
            model[at:at + S] = data
            for _ in range(4):
                raw, asked, writes = stream(rng, model, 10)
                # The client reads while it sends: replies to large READs fill the socket.
                sender = threading.Thread(target=send_in_pieces, args=(rng, c.sock, raw))
                sender.start()
                got = replies(c, asked, structured)
                sender.join()
                for cookie, (cmd, offset, length) in asked.items():
                    error, data = got[cookie]
                    assert error == 0, (cookie, cmd, offset, length)
                    if cmd == NBD_CMD_READ:
                        assert data == model[offset:offset + length], (cookie, offset, length)
                for offset, data in writes:
                    model[offset:offset + len(data)] = data
        wait_until(lambda: settled(srv, export), 10, what="the connection settled")
        served = sum(s[3] + s[5] for s in sessions)
    assert len(sessions) >= count and served > 5 * count, (len(sessions), served)  # they answered
    back = bytearray(SIZE)
    export.backend.pread(memoryview(back), 0)
    assert back == model


def test_pipelined_streams_get_what_the_model_says(disk, sessions):
    srv, export, model = disk
    pipelined_streams(srv, export, model, sessions, 40, seed=20261206)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pipelined_streams_soak(disk, sessions):
    srv, export, model = disk
    seed = random.SystemRandom().randrange(1 << 32)
    print("seed", seed)  # shown with a failure: replay with it
    pipelined_streams(srv, export, model, sessions, 2000, seed=seed)


def mutated_streams(srv, export, sessions, caplog, count: int, seed: int) -> None:
    rng = random.Random(seed)
    model = bytearray(SIZE)
    export.backend.pread(memoryview(model), 0)
    marker = os.urandom(S)
    caplog.set_level(logging.WARNING)
    with RawClient.connected(srv.address, "d") as good:
        for i in range(count):
            structured = rng.random() < .5
            with RawClient.connected(srv.address, "d", structured=structured) as c:
                start_session(srv, c, rng.randbytes(S), offset=rng.randrange(SECTORS) * S,
                              structured=structured)
                raw, _, _ = stream(rng, model, 10)
                try:
                    send_in_pieces(rng, c.sock, mutate(rng, raw))
                    c.sock.shutdown(socket.SHUT_WR)
                    while c.sock.recv(1 << 20):  # replies, until the server closes
                        pass
                except OSError as e:  # the server hung up on us: fine
                    assert e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN), e
                # socket.timeout escapes: a server that never closes a finished stream is a bug.
            if i % 25 == 24:
                good.request(NBD_CMD_WRITE, (SECTORS - 1) * S, S, cookie=i, payload=marker)
                assert good.simple_reply() == (0, i, b"")
                good.request(NBD_CMD_READ, (SECTORS - 1) * S, S, cookie=i + 1)
                assert good.simple_reply(S) == (0, i + 1, marker)
    wait_until(lambda: settled(srv, export), 10, what="every connection settled")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or "internal error" in r.message]
    assert not errors, [r.getMessage() for r in errors]
    assert sum(s[3] + s[5] for s in sessions) > count  # the sessions answered requests


@pytest.mark.timeout(240)
def test_mutated_streams_leave_the_server_whole(disk, sessions, caplog):
    srv, export, _ = disk
    mutated_streams(srv, export, sessions, caplog, 200, seed=20261207)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_mutated_streams_soak(disk, sessions, caplog):
    srv, export, _ = disk
    seed = random.SystemRandom().randrange(1 << 32)
    print("seed", seed)  # shown with a failure: replay with it
    mutated_streams(srv, export, sessions, caplog, 20000, seed=seed)
