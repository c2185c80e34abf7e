"""The control socket between the NBD server's main process and its I/O workers.

One AF_UNIX SOCK_SEQPACKET socketpair per worker (nbdserver/iopool.py, ioworker.py):
each message is one packet, so no framing can be torn, and a connection's socket rides
along as SCM_RIGHTS. A message is a JSON header (what it is, small values) and a binary
tail (a connection's bytes already read past its handshake, a DEK). A DEK never becomes
a Python `bytes` or `str` on either side: it goes out from the cipher's own bytearray
through a memoryview, and comes in into the receiver's buffer, from which the worker
copies it into a fresh bytearray and wipes the buffer (`Receiver.wipe`).

    header length (4 bytes, little-endian) | header (JSON, UTF-8) | tail
"""

from __future__ import annotations

import array
import json
import socket
import struct

# One packet at most: a SEQPACKET message must fit the socket's send buffer (about
# 208 KiB by default), and the largest tail is a handshake's leftover (capped below).
MAX_MESSAGE = 128 * 1024
# Bytes a client sent past its handshake that still travel with its socket; a client
# that pipelined more than this stays in the main process (a rare, harmless case).
MAX_LEFTOVER = 64 * 1024
MAX_FDS = 4
_LEN = struct.Struct("<I")


def message(header: dict, *tail) -> list:
    """The buffers of one message, for `sendmsg` (tail parts are sent as they are, not
    copied: a DEK's memoryview stays a view of the cipher's key)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return [_LEN.pack(len(head)), head, *tail]


def send(sock: socket.socket, buffers: list, fds=()) -> None:
    """Send one message now (BlockingIOError when the socket is full: nothing sent)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    total = sum(memoryview(b).nbytes for b in buffers)
    if total > MAX_MESSAGE:
        raise ValueError(f"control message of {total} bytes exceeds {MAX_MESSAGE}")
    sent = sock.sendmsg(buffers, anc)
    if sent != total:  # SOCK_SEQPACKET sends all or nothing
        raise OSError(f"control message cut short ({sent} of {total} bytes)")


class Receiver:
    """Reads messages from a non-blocking control socket into one reused buffer."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray(MAX_MESSAGE)
        self._used = 0

    def receive(self) -> tuple[dict, memoryview, list[int]] | None:
        """The next message: (header, tail, fds), the tail a view of the buffer valid
        until the next call; None at EOF. BlockingIOError when there is none yet."""
        n, anc, flags, _ = self.sock.recvmsg_into([self.buf], socket.CMSG_SPACE(MAX_FDS * 4))
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
        self._used = n
        if n == 0 and not fds:
            return None
        header = None
        if not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) and n >= _LEN.size:
            (hlen,) = _LEN.unpack_from(self.buf)
            if hlen <= n - _LEN.size:
                try:
                    header = json.loads(bytes(self.buf[_LEN.size:_LEN.size + hlen]))
                except ValueError:  # not JSON, or not UTF-8
                    pass
        if not isinstance(header, dict):
            # Nothing of a malformed message is kept: its descriptors are closed (or each
            # would stay open for the life of the process) and its bytes wiped (it may have
            # carried a DEK).
            for fd in fds:
                socket.close(fd)
            self.wipe()
            raise ValueError("malformed control message")
        return header, memoryview(self.buf)[_LEN.size + hlen:n], fds

    def wipe(self) -> None:
        """Zero what the last message left in the buffer (it may have carried a DEK)."""
        self.buf[:self._used] = bytes(self._used)
        self._used = 0
