"""A minimal NBD server in Python on uvloop, for the `python-floor` bench target: the
floor of any Python event-loop server on the host where the bench runs.

It does the least a client needs: fixed newstyle (NBD_OPT_GO or NBD_OPT_EXPORT_NAME,
every other option refused), simple replies, READ with pread, WRITE with pwrite, FLUSH
with fdatasync, DISC, over one file. No checks, no encryption, no statistics, no flow
control: not a server to use, a measure of what the interpreter and the event loop cost
per request before any of the product's work (doc/proto.md for the messages).

    python -m bench.floor FILE PORT        (prints "LISTENING host port" when ready)
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys

HOST = "127.0.0.1"
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
OPT_EXPORT_NAME, OPT_GO, REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 7, 1, 3, (1 << 31) + 1
FLAGS = 1 | 4 | 8  # HAS_FLAGS, SEND_FLUSH, SEND_FUA (FUA: pwrite then fdatasync)


class Floor(asyncio.Protocol):
    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.buf = bytearray()
        self.options = True

    def connection_made(self, transport):
        self.t = transport
        transport.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))

    def data_received(self, data):
        buf = self.buf
        buf += data
        if self.options:
            self._options()
            if self.options:
                return
        out, pos, fd = [], 0, self.fd
        while len(buf) - pos >= 28:
            _, flags, cmd, cookie, off, n = REQUEST.unpack_from(buf, pos)
            if cmd == 1:  # WRITE
                if len(buf) - pos - 28 < n:
                    break
                os.pwrite(fd, memoryview(buf)[pos + 28:pos + 28 + n], off)
                if flags & 1:
                    os.fdatasync(fd)
                out.append(SIMPLE.pack(0x67446698, 0, cookie))
                pos += 28 + n
                continue
            pos += 28
            if cmd == 0:
                out.append(SIMPLE.pack(0x67446698, 0, cookie))
                out.append(os.pread(fd, n, off))
            elif cmd == 3:
                os.fdatasync(fd)
                out.append(SIMPLE.pack(0x67446698, 0, cookie))
            elif cmd == 2:
                self.t.close()
                return
            else:
                out.append(SIMPLE.pack(0x67446698, 22, cookie))  # EINVAL
        del buf[:pos]
        self.t.writelines(out)

    def _options(self):
        buf = self.buf
        if len(buf) >= 4 and self.options is True:
            del buf[:4]  # the client's flags
            self.options = "haggling"
        while len(buf) >= 16:
            _, opt, n = struct.unpack_from(">QII", buf)
            if len(buf) < 16 + n:
                return
            del buf[:16 + n]
            if opt == OPT_EXPORT_NAME:
                self.t.write(struct.pack(">QH", self.size, FLAGS))
                self.options = False
                return
            if opt == OPT_GO:
                info = struct.pack(">HQH", 0, self.size, FLAGS)
                self.t.write(struct.pack(">QII", REPLY_MAGIC, opt, REP_INFO) + struct.pack(">I", len(info))
                             + info + struct.pack(">QIII", REPLY_MAGIC, opt, REP_ACK, 0))
                self.options = False
                return
            self.t.write(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))


async def serve(path: str, port: int) -> None:
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Floor(fd, size), HOST, port)
    print(f"LISTENING {HOST} {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvloop

    uvloop.run(serve(sys.argv[1], int(sys.argv[2])))


if __name__ == "__main__":
    main()
