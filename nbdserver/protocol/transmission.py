"""The NBD transmission phase, pure: request parsing, request checks, reply encoding.

doc/proto.md, "Transmission" and "Request types". `RequestParser.feed(data)` returns
the requests complete in what arrived so far; `check()` decides whether a request is
valid for an export (the spec's EINVAL/ENOSPC/EPERM rules) before any backend sees it;
the reply shaping functions (`error_reply`, `read_reply_head`, `read_reply`,
`block_status_descriptors` and the chunk encoders under them) build the bytes to send.

Limits, and why:
- A WRITE payload over `max_payload` (32 MiB, announced as NBD_INFO_BLOCK_SIZE maximum)
  is never buffered: the parser skips it as it arrives and yields `Oversized`, which the
  server answers EINVAL. The client stays in sync and the connection goes on.
- A request with the wrong magic means we no longer know where messages start:
  `BadMagic`, and the server disconnects (the only safe answer).
- Alignment is checked against `min_block`, the minimum block size the client agreed to
  (`handshake.Negotiated.min_block`): a client that never asked for block sizes (e.g.
  NBD_OPT_EXPORT_NAME) may send byte-granular requests, which the spec says a server
  SHOULD accept ("Size constraints"); the backends serve them (XtsLayer by
  read-modify-write). One that agreed gets EINVAL for a misaligned request.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from .constants import (
    MAX_BLOCK_SIZE,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOMEM,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EOVERFLOW,
    NBD_EPERM,
    NBD_ESHUTDOWN,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_MAGIC,
)

REQUEST = struct.Struct(">IHHQQI")
REQUEST_SIZE = REQUEST.size  # 28


class Request(NamedTuple):
    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytearray | None = None  # WRITE only, owned by the request
    # WRITE only, instead of `payload`: the consumer's stage that took the payload as it
    # arrived (RequestParser's `stage`).
    stage: object | None = None


class Oversized(NamedTuple):
    """A request whose payload was too large to accept; its payload has been skipped."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int


class BadMagic(NamedTuple):
    magic: int


# What `RequestParser.feed` returns, in order.
Parsed = Request | Oversized | BadMagic
# What feed() takes: the bytes as they came off the socket.
Data = bytes | bytearray | memoryview


class PayloadStage(Protocol):
    """Where a large WRITE's payload goes as it arrives (see RequestParser)."""

    def take(self, piece: memoryview) -> None: ...

    def space(self) -> memoryview | None:
        """The rest of the payload's room, to receive it in place, or None (then `take`)."""

    def took(self, n: int) -> None:
        """`n` more bytes were received into `space()`."""


# A WRITE payload at least this large goes, piece by piece as it arrives, to the
# consumer's stage if it offers one, or else (when it has not fully arrived) into a
# buffer of its own: one copy per byte. Smaller ones are sliced out of the receive
# buffer, where many of them usually arrive in one chunk.
DIRECT_PAYLOAD_MIN = 64 * 1024

# A large WRITE being received: cmd, flags, cookie, offset, length, then its payload
# buffer or the stage taking it (one of the two is None).
_Partial = tuple[int, int, int, int, int, bytearray | None, PayloadStage | None]


def _large_write(header: tuple[int, ...]) -> bool:
    magic, _, cmd, _, _, length = header
    return magic == NBD_REQUEST_MAGIC and cmd == NBD_CMD_WRITE and length >= DIRECT_PAYLOAD_MIN


class RequestParser:
    """`feed(data)` -> the requests complete in what has arrived so far.

    A WRITE's payload is a bytearray the request owns: the consumer may keep it, or
    overwrite it (an encrypting layer encrypts in place), without a copy.

    `stage(offset, length)`, if given, is asked for each WRITE of at least
    DIRECT_PAYLOAD_MIN bytes as its header arrives. It returns None (the payload then
    comes as above) or an object whose `take(view)` receives the payload's bytes in
    order, in as many pieces as they arrive, each piece a memoryview valid only during
    the call. The request then carries that object as `stage` and no `payload`. (The
    server passes its disk's `stage_write`: an encrypting layer encrypts each piece
    straight out of the receive buffer.)

    A large WRITE's payload still to come can also be received straight into its place,
    with no copy: `payload_space()` is that room (the rest of the payload's buffer, or of
    the stage's, if it has one), and `payload_received(n)` says `n` bytes were written at
    its start. A caller that reads the socket itself (a buffered protocol) uses them;
    `feed` alone is enough for any other."""

    def __init__(self, max_payload: int = MAX_BLOCK_SIZE, *,
                 stage: Callable[[int, int], PayloadStage | None] | None = None):
        self._buf = bytearray()
        self._skip = 0
        self._max = max_payload
        self._stage = stage
        # A large WRITE being received: its header fields, payload (or stage) and bytes
        # so far.
        self._partial: _Partial | None = None
        self._have = 0
        self.broken = False

    def buffered(self) -> int:
        return len(self._buf) + self._have

    def at_boundary(self) -> bool:
        """Whether the next byte to arrive begins a request: nothing held back (part of
        a header, a payload) and no refused payload still being skipped. Only then may
        another reader (the server's page-cache fast path) parse the bytes first."""
        return not self._buf and self._partial is None and not self._skip

    def feed(self, data: Data) -> list[Parsed]:
        out: list[Parsed] = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = memoryview(data)[n:]
        if self._partial is not None:
            data = self._fill(data, out)
        buf = self._buf
        unpack = REQUEST.unpack_from
        if not buf and len(data) >= REQUEST_SIZE and _large_write(unpack(data)):
            # A large WRITE begins here: parse where the data is, so that its payload is
            # copied (or staged) once; only an incomplete tail is kept.
            src = data
        else:  # small requests are sliced out of our buffer, the cheapest per request
            buf += data
            src = buf
        pos = 0
        end = len(src)
        while end - pos >= REQUEST_SIZE:
            magic, flags, cmd, cookie, offset, length = unpack(src, pos)
            if magic != NBD_REQUEST_MAGIC:
                self.broken = True
                out.append(BadMagic(magic))
                buf.clear()
                return out
            if cmd == NBD_CMD_WRITE:
                if length > self._max:
                    out.append(Oversized(cmd, flags, cookie, offset, length))
                    pos += REQUEST_SIZE
                    avail = min(length, end - pos)
                    pos += avail
                    self._skip = length - avail
                    continue
                start = pos + REQUEST_SIZE
                stage = None
                if length >= DIRECT_PAYLOAD_MIN and self._stage is not None:
                    stage = self._stage(offset, length)
                if end - start < length:
                    if stage is not None:
                        stage.take(memoryview(src)[start:end])
                        self._have = end - start
                        self._partial = (cmd, flags, cookie, offset, length, None, stage)
                        pos = end
                    elif length >= DIRECT_PAYLOAD_MIN:
                        payload = bytearray(length)
                        self._have = end - start
                        payload[:self._have] = memoryview(src)[start:end]
                        self._partial = (cmd, flags, cookie, offset, length, payload, None)
                        pos = end
                    break
                if stage is not None:
                    stage.take(memoryview(src)[start:start + length])
                    out.append(Request(cmd, flags, cookie, offset, length, None, stage))
                else:
                    payload = src[start:start + length] if src is buf else \
                        bytearray(memoryview(src)[start:start + length])
                    out.append(Request(cmd, flags, cookie, offset, length, payload))
                pos = start + length
            else:
                out.append(Request(cmd, flags, cookie, offset, length))
                pos += REQUEST_SIZE
        if src is buf:
            if pos:
                del buf[:pos]
        elif pos < end:
            buf += memoryview(src)[pos:end]
        return out

    def payload_space(self) -> memoryview | None:
        """Where the large WRITE being received takes its next bytes in place (see the
        class), or None: no such WRITE, or a stage that cannot."""
        if self._partial is None:
            return None
        *_, length, payload, stage = self._partial
        if stage is not None:
            return stage.space()
        if payload is not None:  # one of the two is, always
            return memoryview(payload)[self._have:length]
        return None

    def payload_received(self, n: int) -> list[Parsed]:
        """`n` bytes were written at the start of `payload_space()`: the WRITE, once its
        payload is complete."""
        if self._partial is None:
            raise RuntimeError("payload_received() without a partial WRITE")
        length, stage = self._partial[4], self._partial[6]
        if not 0 < n <= length - self._have:
            raise ValueError(f"{n} bytes received for {length - self._have} still to come")
        if stage is not None:
            stage.took(n)
        done = self._advance(n)
        return [] if done is None else [done]

    def _advance(self, n: int) -> Request | None:
        """`n` more bytes of the partial WRITE's payload are in: the WRITE, once all are."""
        assert self._partial is not None
        cmd, flags, cookie, offset, length, payload, stage = self._partial
        self._have += n
        if self._have < length:
            return None
        self._partial = None
        self._have = 0
        return Request(cmd, flags, cookie, offset, length, payload, stage)

    def _fill(self, data: Data, out: list[Parsed]) -> Data:
        """Copy arriving bytes into the partial WRITE's payload; returns the rest of
        `data` (the next requests) once the payload is complete."""
        if self._partial is None:
            raise RuntimeError("_fill() without a partial WRITE")
        *_, length, payload, stage = self._partial
        take = min(length - self._have, len(data))
        if stage is not None:
            stage.take(memoryview(data)[:take])
        elif payload is not None:  # one of the two is, always
            payload[self._have:self._have + take] = memoryview(data)[:take]
        done = self._advance(take)
        if done is None:
            return b""
        out.append(done)
        return memoryview(data)[take:]


# Flags each command accepts (before checking what the export advertised). FUA is valid
# on every command once NBD_FLAG_SEND_FUA is negotiated: the server MUST accept it, even
# by ignoring it (doc/proto.md, "Command flags").
_ALLOWED_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_DISC: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_CACHE: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
}
# The transmission flag a command needs to have been advertised.
_NEEDS = {
    NBD_CMD_FLUSH: NBD_FLAG_SEND_FLUSH,
    NBD_CMD_TRIM: NBD_FLAG_SEND_TRIM,
    NBD_CMD_CACHE: NBD_FLAG_SEND_CACHE,
    NBD_CMD_WRITE_ZEROES: NBD_FLAG_SEND_WRITE_ZEROES,
}
_WRITES = (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES)
_RANGED = (NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_CACHE, NBD_CMD_WRITE_ZEROES,
           NBD_CMD_BLOCK_STATUS)


def check(req: Request | Oversized, size: int, tflags: int, *, has_meta: bool,
          min_block: int = MIN_BLOCK_SIZE, max_payload: int = MAX_BLOCK_SIZE) -> tuple[int, str]:
    """(0, "") if the request may go to the backend, else (nbd error, message)."""
    cmd = req.cmd
    if not req.flags and (cmd == NBD_CMD_READ or cmd == NBD_CMD_WRITE and not tflags & NBD_FLAG_READ_ONLY):
        # Most requests: a READ, or a WRITE to a writable export, without flags. Of the
        # rules only the range's apply to them, so those are all they pay for: this runs
        # for every request, and walking every rule was a measurable part of a 4 KiB
        # request's cost. The answers are check_rules' (the tests compare the two).
        off, length = req.offset, req.length
        if length > max_payload:
            return NBD_EINVAL, f"request over {max_payload} bytes"
        if min_block > 1 and (off % min_block or length % min_block):
            return NBD_EINVAL, f"request not aligned to {min_block} bytes"
        if off + length > size:
            if cmd == NBD_CMD_WRITE:
                return NBD_ENOSPC, "write past the end of the export"
            return NBD_EINVAL, "request past the end of the export"
        return 0, ""
    return check_rules(req, size, tflags, has_meta=has_meta, min_block=min_block, max_payload=max_payload)


def check_rules(req: Request | Oversized, size: int, tflags: int, *, has_meta: bool,
                min_block: int = MIN_BLOCK_SIZE, max_payload: int = MAX_BLOCK_SIZE) -> tuple[int, str]:
    """`check`, by every rule in turn: any request, any flags."""
    cmd, flags = req.cmd, req.flags
    allowed = _ALLOWED_FLAGS.get(cmd)
    if allowed is None:
        return NBD_EINVAL, f"unknown command {cmd}"
    if flags & ~allowed:
        return NBD_EINVAL, f"flags {flags:#x} not valid for this command"
    # Before "not advertised": a read-only export advertises no TRIM or WRITE_ZEROES, yet
    # the spec asks for EPERM on a write, trim or write zeroes there ("Error values").
    if cmd in _WRITES and tflags & NBD_FLAG_READ_ONLY:
        return NBD_EPERM, "export is read-only"
    need = _NEEDS.get(cmd)
    if need and not tflags & need:
        return NBD_EINVAL, "command not advertised for this export"
    if flags & NBD_CMD_FLAG_DF:
        return NBD_EINVAL, "DF was not advertised"
    if flags & NBD_CMD_FLAG_FUA and not tflags & NBD_FLAG_SEND_FUA and cmd in _WRITES:
        return NBD_EINVAL, "FUA was not advertised"
    if flags & NBD_CMD_FLAG_FAST_ZERO and not tflags & NBD_FLAG_SEND_FAST_ZERO:
        return NBD_EINVAL, "FAST_ZERO was not advertised"
    if cmd == NBD_CMD_BLOCK_STATUS and not has_meta:
        return NBD_EINVAL, "no metadata context was negotiated"
    if cmd in _RANGED:
        off, length = req.offset, req.length
        if (cmd in (NBD_CMD_READ, NBD_CMD_WRITE)) and length > max_payload:
            return NBD_EINVAL, f"request over {max_payload} bytes"
        if min_block > 1 and (off % min_block or length % min_block):
            return NBD_EINVAL, f"request not aligned to {min_block} bytes"
        if cmd == NBD_CMD_BLOCK_STATUS and length == 0:
            return NBD_EINVAL, "zero-length block status"
        if off + length > size:
            if cmd == NBD_CMD_WRITE or cmd == NBD_CMD_WRITE_ZEROES:
                return NBD_ENOSPC, "write past the end of the export"
            return NBD_EINVAL, "request past the end of the export"
    return 0, ""


_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP, errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(err: int | None) -> int:
    """The NBD wire error for a host errno (anything unknown is EIO)."""
    return _ERRNO_TO_NBD.get(err or errno.EIO, NBD_EIO)


# --- replies
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
_DATA_HEAD = struct.Struct(">IHHQIQ")


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, ctype: int, payload: bytes = b"", *, done: bool = True) -> bytes:
    return CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0, ctype,
                      cookie, len(payload)) + payload


def data_chunk_header(cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk; `length` bytes of data follow it."""
    return _DATA_HEAD.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                           NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)


def hole_chunk(cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
    return chunk(cookie, NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, length), done=done)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return chunk(cookie, NBD_REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg)


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk(cookie, NBD_REPLY_TYPE_BLOCK_STATUS, body)


# --- reply shaping: the bytes for each outcome of a request, in the reply style the
# client negotiated (doc/proto.md, "Simple reply message", "Structured reply message").
# The server only picks the outcome; what it looks like on the wire is decided here.

# Reply bytes as they go to the transport: headers made here, data as the backend left it.
Piece = bytes | bytearray | memoryview


def error_reply(cookie: int, error: int, message: str, *, structured: bool) -> bytes:
    """A failed request: an error chunk carrying `message` when structured, else a
    simple reply with the error and no data, even for a READ (doc/proto.md, "Simple
    reply message": the client cannot know how long a failed read's data would be)."""
    if structured:
        return error_chunk(cookie, error, message)
    return simple_reply(cookie, error)


def read_reply_head(cookie: int, offset: int, length: int, *, structured: bool) -> bytes:
    """What goes before the `length` bytes of a READ answered as one piece of data:
    the header of one OFFSET_DATA chunk, the last, or a simple reply."""
    if structured:
        return data_chunk_header(cookie, offset, length)
    return simple_reply(cookie)


def read_reply(cookie: int, parts: list[tuple[int, int, Piece | None]], *,
               structured: bool) -> list[Piece]:
    """A READ answered in parts `(offset, length, data)`, in order, `data` None for a
    range that reads as zeros (a hole). Structured: one chunk per part, OFFSET_HOLE for
    a hole (no data sent) and OFFSET_DATA otherwise, the last flagged done. Simple: the
    reply, then every part's bytes, a hole as zeros (a simple reply cannot leave it out)."""
    if not structured:
        out: list[Piece] = [simple_reply(cookie)]
        out.extend(bytes(n) if data is None else data for _, n, data in parts)
        return out
    out = []
    last = len(parts) - 1
    for i, (offset, n, data) in enumerate(parts):
        if data is None:
            out.append(hole_chunk(cookie, offset, n, done=i == last))
        else:
            out.append(data_chunk_header(cookie, offset, n, done=i == last))
            out.append(data)
    return out


class Allocation(Protocol):
    """One run of a backend's block status (`nbdserver.backend.Extent` is one)."""

    @property
    def length(self) -> int: ...
    @property
    def hole(self) -> bool: ...
    @property
    def zero(self) -> bool: ...


def block_status_descriptors(extents: Iterable[Allocation], *, one: bool = False) -> list[tuple[int, int]]:
    """The `base:allocation` descriptors `(length, flags)` of a backend's runs: HOLE
    and ZERO flags (doc/proto.md, "base:allocation metadata context"), neighbours with
    the same flags merged (the client needs no more detail than that). With `one`
    (NBD_CMD_FLAG_REQ_ONE) only the first run. Empty when `extents` is."""
    out: list[tuple[int, int]] = []
    for e in extents:
        flags = (NBD_STATE_HOLE if e.hole else 0) | (NBD_STATE_ZERO if e.zero else 0)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + e.length, flags)
        else:
            out.append((e.length, flags))
        if one:
            break
    return out
