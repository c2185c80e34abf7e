"""The NBD fixed-newstyle handshake as a pure state machine (doc/proto.md, "Handshake").

Theory of operation: the driver (the asyncio server) sends `greeting()`, then feeds
every byte it receives to `receive(data)`, which returns a list of actions:

- `Send(data)`: bytes to write to the client, in order.
- `StartTls()`: an NBD_REP_ACK to STARTTLS has been queued; the driver upgrades the
  transport to TLS after sending it and then calls `tls_established()`.
- `Ready(negotiated)`: the handshake is over; the connection is in transmission.
  Bytes after the final option are kept in `leftover` for the transmission parser.
  `negotiated.min_block` is the alignment the client agreed to keep: the export's
  minimum block size only after an NBD_OPT_GO that asked for NBD_INFO_BLOCK_SIZE, else 1
  (doc/proto.md, "Size constraints": only such a GO commits a client to the constraints,
  and a server SHOULD then support the default minimum block size of 1).
- `Close(reason)`: a hard or soft disconnect (abort, violation, unknown export after
  NBD_OPT_EXPORT_NAME). The driver closes after sending what came before.

The export a client selects may still fail to open after the name was accepted (its key
refused meanwhile, its file gone): the driver then drops the selection's replies
(`Ready.replies`) and calls `unready(message)`, which answers an NBD_OPT_GO with
NBD_REP_ERR_UNKNOWN and goes back to option haggling, and closes after
NBD_OPT_EXPORT_NAME (which has no error reply).

No sockets, files or clocks here. Exports are looked up through a `Catalog` the driver
passes in: a plain object answering questions, so tests drive the machine in memory.

Invariants:
1. Nothing is sent before the client's flags arrive, except the greeting.
2. Every option gets exactly one final reply (ACK or an error), except EXPORT_NAME
   (which has none on failure: the spec says the server terminates the session) and
   ABORT (an ACK, then Close).
3. With TLS required and not yet established, every option but STARTTLS and ABORT is
   answered NBD_REP_ERR_TLS_REQD and no export is revealed. What a client may see after
   that is the catalog's to decide (`listing` may refuse); `ExportRefused.detail` is
   never sent.
4. An option payload larger than MAX_OPTION_LENGTH is never buffered: it is skipped
   as it arrives and answered NBD_REP_ERR_TOO_BIG.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from .constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_SHUTDOWN,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_TOO_BIG,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
)

BASE_ALLOCATION_ID = 1  # the context id this server gives base:allocation


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    flags: int  # transmission flags, NBD_FLAG_HAS_FLAGS included
    description: str = ""
    min_block: int = 512
    preferred_block: int = 4096
    max_block: int = 32 << 20


class ExportRefused(Exception):
    """The catalog's answer when an export cannot be used: an option error and a message
    for the client, and a `detail` for the operator's log that is never sent."""

    def __init__(self, reply_type: int, message: str, detail: str = ""):
        super().__init__(message)
        self.reply_type = reply_type
        self.message = message
        self.detail = detail


class Catalog(Protocol):
    def lookup(self, name: str) -> ExportInfo:
        """The export by name ("" is the default export); raises ExportRefused."""

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every export a client may see; raises ExportRefused
        when this client may not list the exports at all."""


class TlsMode(Enum):
    OFF = "off"
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class Negotiated:
    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str]
    tls: bool
    # Requests must be multiples of this (offset and length): see the module docstring.
    min_block: int = 1


@dataclass(frozen=True)
class Ready:
    negotiated: Negotiated
    # How many of the Sends just before this event answer the selection itself (GO's
    # NBD_INFO replies and ACK, or EXPORT_NAME's reply): the driver holds them back
    # until the export has opened, and drops them if it cannot (`unready`).
    replies: int = 0


@dataclass(frozen=True)
class Close:
    reason: str


# What `Handshake.receive` returns, in order.
Event = Send | StartTls | Ready | Close


class State(Enum):
    AWAIT_CLIENT_FLAGS = "await client flags"
    OPTIONS = "options"
    SKIPPING = "skipping an oversized option"
    TLS_PENDING = "TLS upgrade pending"
    DONE = "transmission"
    CLOSED = "closed"


# States after which receive() takes no more bytes. A set, not a tuple literal: each step
# changes the state, and a type checker must not take the state narrowed by the first test.
_FINAL = frozenset({State.DONE, State.CLOSED})

_OPT_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option: int, reply_type: int, message: str) -> bytes:
    return option_reply(option, reply_type, message.encode()[:MAX_STRING])


class _BadOption(Exception):
    """A malformed option payload: answered NBD_REP_ERR_INVALID, the handshake goes on."""


@dataclass
class _Selection:
    structured: bool = False
    meta_export: str | None = None
    meta_contexts: dict[int, str] = field(default_factory=dict)


class Handshake:
    def __init__(self, catalog: Catalog, *, tls_mode: TlsMode = TlsMode.OFF):
        self._catalog = catalog
        self._tls_mode = tls_mode
        self._tls = False
        self._buf = bytearray()
        self._skip = 0
        self._skip_option = 0
        self._no_zeroes = False
        self._sel = _Selection()
        self.state = State.AWAIT_CLIENT_FLAGS
        self.shutting_down = False
        self.leftover = b""
        self._selected_by = 0  # the option of the last Ready (GO or EXPORT_NAME)

    @staticmethod
    def greeting() -> bytes:
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)

    def tls_established(self) -> None:
        if self.state is not State.TLS_PENDING:
            raise RuntimeError("tls_established() outside a STARTTLS upgrade")
        self._tls = True
        # Anything negotiated in plaintext could have been forged: start over.
        self._sel = _Selection()
        self.state = State.OPTIONS

    def unready(self, message: str) -> list[Event]:
        """The export of the last `Ready` could not be opened: take the selection back.
        After NBD_OPT_GO, an NBD_REP_ERR_UNKNOWN error (the spec's "the requested export
        is not available") and the options go on, with any bytes the client sent after
        the GO read as options again; after NBD_OPT_EXPORT_NAME, a Close."""
        if self.state is not State.DONE:
            raise RuntimeError(f"unready() in state {self.state.value}")
        if self._selected_by == NBD_OPT_EXPORT_NAME:
            out: list[Event] = []
            self._close(out, message)
            return out
        self.state = State.OPTIONS
        self._buf[:0] = self.leftover
        self.leftover = b""
        return [Send(option_error(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, message)), *self.receive(b"")]

    def receive(self, data: bytes) -> list[Event]:
        if self.state in _FINAL:
            raise RuntimeError(f"receive() in state {self.state.value}")
        self._buf += data
        out: list[Event] = []
        while self.state not in _FINAL:
            if not self._step(out):
                break
        if self.state is State.DONE:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        return out

    # -- one step of the machine; False when more bytes are needed
    def _step(self, out: list[Event]) -> bool:
        buf = self._buf
        if self.state is State.AWAIT_CLIENT_FLAGS:
            if len(buf) < 4:
                return False
            (flags,) = struct.unpack_from(">I", buf)
            del buf[:4]
            if flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
                return self._close(out, f"unknown client flags {flags:#x}")
            if not flags & NBD_FLAG_C_FIXED_NEWSTYLE:
                # Plain newstyle clients may only send EXPORT_NAME; we still parse
                # options the same way, which is a superset.
                pass
            self._no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
            self.state = State.OPTIONS
            return True
        if self.state is State.SKIPPING:
            n = min(self._skip, len(buf))
            del buf[:n]
            self._skip -= n
            if self._skip:
                return False
            self.state = State.OPTIONS
            if self._skip_option == NBD_OPT_EXPORT_NAME:
                return self._close(out, "export name too long")
            out.append(Send(option_error(self._skip_option, NBD_REP_ERR_TOO_BIG,
                                         f"option payload over {MAX_OPTION_LENGTH} bytes")))
            return True
        if self.state is State.TLS_PENDING:
            if buf:
                return self._close(out, "data sent before the TLS handshake")
            return False
        # OPTIONS
        if len(buf) < 16:
            return False
        magic, option, length = _OPT_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            return self._close(out, "bad option magic")
        if length > MAX_OPTION_LENGTH:
            del buf[:16]
            self._skip, self._skip_option = length, option
            self.state = State.SKIPPING
            return True
        if len(buf) < 16 + length:
            return False
        payload = bytes(buf[16:16 + length])
        del buf[:16 + length]
        try:
            self._option(option, payload, out)
        except _BadOption as e:
            out.append(Send(option_error(option, NBD_REP_ERR_INVALID, str(e))))
        return True

    def _close(self, out: list[Event], reason: str) -> bool:
        self.state = State.CLOSED
        out.append(Close(reason))
        return False

    # -- options
    def _option(self, option: int, data: bytes, out: list[Event]) -> None:
        if option == NBD_OPT_ABORT:
            out.append(Send(option_reply(option, NBD_REP_ACK)))
            self._close(out, "client aborted")
            return
        if self.shutting_down:
            if option == NBD_OPT_EXPORT_NAME:
                self._close(out, "server shutting down")
            else:
                out.append(Send(option_error(option, NBD_REP_ERR_SHUTDOWN, "server is shutting down")))
            return
        if option == NBD_OPT_STARTTLS:
            return self._starttls(data, out)
        if self._tls_mode is TlsMode.REQUIRED and not self._tls:
            if option == NBD_OPT_EXPORT_NAME:
                self._close(out, "TLS required")
            else:
                out.append(Send(option_error(option, NBD_REP_ERR_TLS_REQD, "TLS is required")))
            return
        if option == NBD_OPT_EXPORT_NAME:
            return self._export_name(data, out)
        if option == NBD_OPT_LIST:
            return self._list(data, out)
        if option in (NBD_OPT_INFO, NBD_OPT_GO):
            return self._info_go(option, data, out)
        if option == NBD_OPT_STRUCTURED_REPLY:
            if data:
                raise _BadOption("STRUCTURED_REPLY takes no data")
            self._sel.structured = True
            out.append(Send(option_reply(option, NBD_REP_ACK)))
            return
        if option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
            return self._meta_context(option, data, out)
        out.append(Send(option_error(option, NBD_REP_ERR_UNSUP, f"option {option} is not supported")))

    def _starttls(self, data: bytes, out: list[Event]) -> None:
        if data:
            raise _BadOption("STARTTLS takes no data")
        if self._tls_mode is TlsMode.OFF:
            out.append(Send(option_error(NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP, "TLS is not configured")))
        elif self._tls:
            out.append(Send(option_error(NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, "TLS is already active")))
        else:
            out.append(Send(option_reply(NBD_OPT_STARTTLS, NBD_REP_ACK)))
            out.append(StartTls())
            self.state = State.TLS_PENDING

    def _export_name(self, data: bytes, out: list[Event]) -> None:
        try:
            info = self._catalog.lookup(_decode(data))
        except (ExportRefused, _BadOption) as e:
            # NBD_OPT_EXPORT_NAME has no error reply: the spec says terminate.
            self._close(out, f"export refused: {e}")
            return
        reply = struct.pack(">QH", info.size, info.flags)
        if not self._no_zeroes:
            reply += bytes(124)
        out.append(Send(reply))
        # No way to learn block sizes: byte-granular.
        self._ready(info, out, min_block=1, option=NBD_OPT_EXPORT_NAME, replies=1)

    def _ready(self, info: ExportInfo, out: list[Event], *, min_block: int, option: int,
               replies: int) -> None:
        contexts = self._sel.meta_contexts if self._sel.meta_export == info.name else {}
        self.state = State.DONE
        self._selected_by = option
        out.append(Ready(Negotiated(info, self._sel.structured, dict(contexts), self._tls,
                                    min_block), replies))

    def _list(self, data: bytes, out: list[Event]) -> None:
        if data:
            raise _BadOption("LIST takes no data")
        try:
            listing = self._catalog.listing()
        except ExportRefused as e:  # the server does not reveal its exports to this client
            out.append(Send(option_error(NBD_OPT_LIST, e.reply_type, e.message)))
            return
        for name, description in listing:
            n = name.encode()
            out.append(Send(option_reply(NBD_OPT_LIST, NBD_REP_SERVER,
                                         struct.pack(">I", len(n)) + n + description.encode()[:MAX_STRING])))
        out.append(Send(option_reply(NBD_OPT_LIST, NBD_REP_ACK)))

    def _info_go(self, option: int, data: bytes, out: list[Event]) -> None:
        name, pos = _read_string(data, 0)
        if len(data) < pos + 2:
            raise _BadOption("truncated information request count")
        (count,) = struct.unpack_from(">H", data, pos)
        if len(data) != pos + 2 + 2 * count:
            raise _BadOption("information request count does not match the length")
        wanted = set(struct.unpack_from(f">{count}H", data, pos + 2))
        try:
            info = self._catalog.lookup(name)
        except ExportRefused as e:
            out.append(Send(option_error(option, e.reply_type, e.message)))
            return
        replies = [struct.pack(">HQH", NBD_INFO_EXPORT, info.size, info.flags),
                   struct.pack(">HIII", NBD_INFO_BLOCK_SIZE, info.min_block, info.preferred_block,
                               info.max_block)]
        if NBD_INFO_NAME in wanted:
            replies.append(struct.pack(">H", NBD_INFO_NAME) + info.name.encode())
        if NBD_INFO_DESCRIPTION in wanted and info.description:
            replies.append(struct.pack(">H", NBD_INFO_DESCRIPTION) + info.description.encode()[:MAX_STRING])
        for r in replies:
            out.append(Send(option_reply(option, NBD_REP_INFO, r)))
        out.append(Send(option_reply(option, NBD_REP_ACK)))
        if option == NBD_OPT_GO:
            # The constraints bind only a client that asked for them in this GO (an
            # earlier INFO does not count: doc/proto.md, NBD_INFO_BLOCK_SIZE).
            self._ready(info, out,
                        min_block=info.min_block if NBD_INFO_BLOCK_SIZE in wanted else 1,
                        option=option, replies=len(replies) + 1)

    def _meta_context(self, option: int, data: bytes, out: list[Event]) -> None:
        name, pos = _read_string(data, 0)
        if len(data) < pos + 4:
            raise _BadOption("truncated query count")
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            q, pos = _read_string(data, pos)
            queries.append(q)
        if pos != len(data):
            raise _BadOption("trailing bytes after the queries")
        setting = option == NBD_OPT_SET_META_CONTEXT
        if setting and not self._sel.structured:
            raise _BadOption("SET_META_CONTEXT needs structured replies first")
        try:
            # Keep the export's own name: "" (the default export) must match the GO
            # that names it either way.
            export_name = self._catalog.lookup(name).name
        except ExportRefused as e:
            out.append(Send(option_error(option, NBD_REP_ERR_UNKNOWN, e.message)))
            return
        if setting:
            matched = BASE_ALLOCATION in queries
        else:
            # LIST with no queries, or the namespace wildcard "base:", lists everything.
            matched = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        if matched:
            out.append(Send(option_reply(option, NBD_REP_META_CONTEXT,
                                         struct.pack(">I", BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())))
        if setting:
            self._sel.meta_export = export_name
            self._sel.meta_contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION} if matched else {}
        out.append(Send(option_reply(option, NBD_REP_ACK)))


def _decode(raw: bytes) -> str:
    if len(raw) > MAX_STRING:
        raise _BadOption(f"string longer than {MAX_STRING} bytes")
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadOption("string is not valid UTF-8") from None
    if "\0" in s:
        raise _BadOption("string contains NUL")
    return s


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    """A u32 length followed by that many bytes of UTF-8."""
    if len(data) < pos + 4:
        raise _BadOption("truncated string length")
    (n,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if len(data) < pos + n:
        raise _BadOption("string runs past the option")
    return _decode(data[pos:pos + n]), pos + n
