"""Coverage-guided fuzzing of the pure NBD protocol code with atheris (libFuzzer).

    python -m tests.reliability.fuzz_protocol {handshake|transmission} [libFuzzer flags]

The protocol package is imported instrumented, so libFuzzer steers inputs toward new
branches of `Handshake.receive`, `RequestParser.feed` and `check`. Each input is split
into chunks at points chosen by its first bytes (the network may cut anywhere). The
properties, beyond "no exception":

- handshake: only the machine's own actions come out; once it says Close or Ready it
  stops; every Send is well-framed option replies (or the greeting reply);
- transmission: feeding the same bytes whole or in chunks yields the same events
  (the parser has no hidden dependency on how bytes arrive); every WRITE carries exactly
  its payload; `check` answers (0 or an NBD error, a message) for any request.
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports():
    from nbdserver.protocol import handshake as hs
    from nbdserver.protocol import transmission as tx
    from nbdserver.protocol.constants import (
        NBD_CMD_WRITE,
        NBD_REP_ERR_UNKNOWN,
        NBD_REQUEST_MAGIC,
        OPTION_REPLY_MAGIC,
    )

FLAGS = 0x1 | 0x4 | 0x8


class Catalog:
    exports = {"disk": hs.ExportInfo("disk", 1 << 20, FLAGS, "the disk"),
               "other": hs.ExportInfo("other", 2 << 20, FLAGS | 0x2)}

    def lookup(self, name):
        try:
            return self.exports[name or "disk"]
        except KeyError:
            raise hs.ExportRefused(NBD_REP_ERR_UNKNOWN, "no such export") from None

    def listing(self):
        return [(i.name, i.description) for i in self.exports.values()]


def chunks(data: bytes) -> list[bytes]:
    """data[1:] in pieces of 1 + data[0] % 64 bytes."""
    if not data:
        return [b""]
    step = 1 + data[0] % 64
    body = data[1:]
    return [body[i:i + step] for i in range(0, len(body), step)] or [b""]


def fuzz_handshake(data: bytes) -> None:
    mode = [hs.TlsMode.OFF, hs.TlsMode.OPTIONAL, hs.TlsMode.REQUIRED][data[0] % 3] if data else hs.TlsMode.OFF
    h = hs.Handshake(Catalog(), tls_mode=mode)
    for piece in chunks(data[1:]):  # data[0]: the TLS mode, data[1]: the chunk size
        actions = h.receive(piece)
        for a in actions:
            assert isinstance(a, (hs.Send, hs.StartTls, hs.Ready, hs.Close)), a
        for a in actions:
            if isinstance(a, hs.Send) and len(a.data) >= 20:
                magic = struct.unpack_from(">Q", a.data)[0]
                # Option replies, or the 124/134-byte EXPORT_NAME answer (size, flags, zeroes).
                assert magic == OPTION_REPLY_MAGIC or len(a.data) in (10, 134), a.data[:32]
        if h.state is hs.State.TLS_PENDING:
            h.tls_established()
        if h.state in (hs.State.DONE, hs.State.CLOSED):
            return


def _events(parser: tx.RequestParser, pieces) -> list:
    out = []
    for p in pieces:
        out += parser.feed(p)
        if parser.broken:
            break
    return out


def request_stream(data: bytes) -> bytes:
    """Structure-aware half of the corpus: requests with the right magic built from the
    fuzzer's bytes (libFuzzer alone rarely guesses a 32-bit magic), payloads whose
    length may or may not match, and now and then a wrong magic."""
    fdp = atheris.FuzzedDataProvider(data)
    out = bytearray()
    while fdp.remaining_bytes() > 4:
        magic = NBD_REQUEST_MAGIC if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeInt(4) & 0xFFFFFFFF
        flags = fdp.ConsumeIntInRange(0, 0xFFFF) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 15)
        cmd = fdp.ConsumeIntInRange(0, 12)
        offset = fdp.ConsumeIntInRange(0, (1 << 64) - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 1 << 21)
        length = fdp.ConsumeIntInRange(0, (1 << 32) - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 1 << 17)
        out += struct.pack(">IHHQQI", magic, flags, cmd, fdp.ConsumeInt(8) & ((1 << 64) - 1), offset, length)
        if cmd == NBD_CMD_WRITE:
            out += fdp.ConsumeBytes(min(length, fdp.ConsumeIntInRange(0, 4096)))
    return bytes(out)


def fuzz_transmission(data: bytes) -> None:
    if data and not data[0] & 0x80:
        data = data[:1] + request_stream(data[1:])  # data[0]: mode and chunk size
    whole = _events(tx.RequestParser(max_payload=1 << 16), [data[1:]])
    split = _events(tx.RequestParser(max_payload=1 << 16), chunks(data))
    assert whole == split, (whole, split)
    size = 1 << 20 if not data else (data[0] << 12)
    for ev in whole:
        if type(ev) is tx.Request:
            if ev.cmd == NBD_CMD_WRITE:
                assert ev.payload is not None and len(ev.payload) == ev.length
            err, msg = tx.check(ev, size, FLAGS | (0x2 if size & 0x1000 else 0) | 0x20 | 0x40,
                                has_meta=bool(size & 0x2000))
            assert isinstance(err, int) and isinstance(msg, str)
            assert (err == 0) == (msg == "")
        else:
            assert type(ev) in (tx.Oversized, tx.BadMagic), ev


TARGETS = {"handshake": fuzz_handshake, "transmission": fuzz_transmission}


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
