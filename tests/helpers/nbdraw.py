"""A tiny NBD client over a raw socket, for sending what well-behaved clients never send.

It speaks the fixed-newstyle handshake by hand (doc/proto.md, "Handshake") and frames
transmission requests and replies, with no checks of its own: the tests decide what is
valid. Every read has a deadline (the socket timeout), so a server that stops answering
fails the test instead of hanging it.
"""

from __future__ import annotations

import socket
import struct

from nbdserver.protocol.constants import (
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_INFO,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
)

TIMEOUT = 20.0


class ServerClosed(Exception):
    """The server closed the connection."""


class RawClient:
    def __init__(self, address: tuple[str, int], timeout: float = TIMEOUT):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.size = None
        self.tflags = None
        self.no_zeroes = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- bytes
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise ServerClosed(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def closed_by_server(self) -> bool:
        """True once the server has closed (EOF or reset); waits up to the timeout."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    # -- handshake
    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, "bad greeting"
        return flags

    def start(self, client_flags: int = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) -> None:
        self.greeting()
        self.send(struct.pack(">I", client_flags))
        self.no_zeroes = bool(client_flags & NBD_FLAG_C_NO_ZEROES)

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        """(option, reply type, data) of the next option reply."""
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return option, rtype, self.recv_exact(length)

    def replies_until_final(self) -> list[tuple[int, int, bytes]]:
        """Option replies up to and including the first that is not INFO/SERVER/META."""
        out = []
        while True:
            r = self.option_reply()
            out.append(r)
            if r[1] == NBD_REP_ACK or r[1] & (1 << 31):
                return out

    def go(self, name: str = "", *, structured: bool = False, block_size: bool = False) -> None:
        """Negotiate to transmission with NBD_OPT_GO; records size and flags. With
        `block_size`, the GO asks for NBD_INFO_BLOCK_SIZE, which commits this client to
        the server's size constraints (doc/proto.md, "Size constraints")."""
        if structured:
            self.send_option(NBD_OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == NBD_REP_ACK
        n = name.encode()
        infos = struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE) if block_size else struct.pack(">H", 0)
        self.send_option(NBD_OPT_GO, struct.pack(">I", len(n)) + n + infos)
        for _, rtype, data in self.replies_until_final():
            if rtype == NBD_REP_INFO and struct.unpack_from(">H", data)[0] == 0:
                _, self.size, self.tflags = struct.unpack(">HQH", data)
            elif rtype != NBD_REP_INFO and rtype != NBD_REP_ACK:
                raise AssertionError(f"GO refused: {rtype:#x} {data!r}")

    def export_name(self, name: str = "") -> None:
        """Negotiate to transmission with NBD_OPT_EXPORT_NAME (the oldest way, which
        learns no block sizes); records size and flags."""
        self.send_option(NBD_OPT_EXPORT_NAME, name.encode())
        self.size, self.tflags = struct.unpack(">QH", self.recv_exact(10))
        if not self.no_zeroes:
            self.recv_exact(124)

    @classmethod
    def connected(cls, address, name: str = "", *, structured: bool = False,
                  block_size: bool = False) -> RawClient:
        c = cls(address)
        c.start()
        c.go(name, structured=structured, block_size=block_size)
        return c

    # -- transmission
    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 1,
                payload: bytes = b"", magic: int = NBD_REQUEST_MAGIC) -> None:
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)

    def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data): data is read only when the reply is a success."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC, f"bad simple reply magic {magic:#x}"
        data = self.recv_exact(read_length) if read_length and not error else b""
        return error, cookie, data

    def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured reply chunk."""
        magic, flags, ctype, cookie, length = struct.unpack(">IHHQI", self.recv_exact(20))
        assert magic == NBD_STRUCTURED_REPLY_MAGIC, f"bad chunk magic {magic:#x}"
        return flags, ctype, cookie, self.recv_exact(length)
