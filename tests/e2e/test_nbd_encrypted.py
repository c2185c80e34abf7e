"""Writes through the server onto an encrypted disk (the baseline runner with `key=`).

A large WRITE payload is encrypted piece by piece as it arrives (`EncryptingStage`),
straight out of the receive buffer; smaller and unaligned ones go through
`XtsLayer.pwrite`. Whatever the path, the request sizes, and however TCP cuts the
payload, the file must hold exactly the dm-crypt format (checked sector by sector with
`cryptography`) and read back as written.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from nbdserver.protocol.constants import (
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_REQUEST_MAGIC,
)
from tests.helpers.images import dek_file, dmcrypt_sector
from tests.helpers.nbdraw import RawClient

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

pytestmark = pytest.mark.timeout(120)
S = 4096
KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB


@pytest.fixture(params=["writeback", "none"], ids=["cache-writeback", "cache-none"])
def encrypted(request, server_factory, tmp_path):
    """(server, image path, key): a 16 MiB encrypted export named `enc`, in each cache
    mode (none: O_DIRECT, the ciphertext written from aligned buffers)."""
    key, keyfile = dek_file(tmp_path)
    image = tmp_path / "enc.img"
    srv = server_factory([f"enc={image},size={SIZE},key={keyfile},cache={request.param}"])
    return srv, image, key


def assert_dmcrypt(image, key, offset: int, plain: bytes) -> None:
    """The file holds aes-xts-plain64 (4096-byte sectors, tweak = sector) of `plain`."""
    assert offset % S == 0 and len(plain) % S == 0
    with open(image, "rb") as f:
        f.seek(offset)
        stored = f.read(len(plain))
    for i in range(0, len(plain), S):
        sector = (offset + i) // S
        assert stored[i:i + S] == dmcrypt_sector(key, sector, plain[i:i + S]), \
            f"sector {sector} is not the ciphertext of what was written"


def test_writes_of_every_size_in_flight_at_once_land_as_dmcrypt(encrypted):
    srv, image, key = encrypted
    rng = random.Random(3)
    # Staged (>= 64 KiB, whole sectors), small, and unaligned (read-modify-write) writes.
    writes = [(0, 4 * MiB), (5 * MiB, 1 * MiB), (7 * MiB, 64 * KiB), (8 * MiB, 96 * KiB + S),
              (9 * MiB + 512, 200 * KiB), (12 * MiB, 4 * KiB), (13 * MiB, 32 * MiB // 16)]
    data = {off: rng.randbytes(n) for off, n in writes}
    h = nbd.NBD()
    h.connect_uri(srv.uri("enc"))
    try:
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off) for off, d in data.items()]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)  # raises on an error
        h.flush()
        for off, d in data.items():
            assert h.pread(len(d), off) == d
    finally:
        h.shutdown()
    for off, d in data.items():
        if off % S == 0 and len(d) % S == 0:
            assert_dmcrypt(image, key, off, d)


def test_a_payload_cut_into_odd_pieces_is_encrypted_as_one(encrypted):
    """A raw client sends one 1 MiB WRITE in pieces cut inside sectors (and inside the
    next request's header); the server may see them in any grouping."""
    srv, image, key = encrypted
    plain = os.urandom(1 * MiB)
    offset = 3 * MiB
    stream = (struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 1, offset, len(plain)) + plain
              + struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_FLUSH, 2, 0, 0))
    with RawClient.connected(srv.address, "enc") as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rng = random.Random(7)
        pos = 0
        while pos < len(stream):
            n = rng.choice([1, 7, S - 1, S + 1, 3 * S + 5, 64 * KiB + 3])
            c.send(stream[pos:pos + n])
            pos += n
        # The spec lets the server answer the two in either order.
        replies = {c.simple_reply()[:2] for _ in range(2)}
        assert replies == {(0, 1), (0, 2)}
        c.request(NBD_CMD_READ, offset, len(plain), cookie=3)
        assert c.simple_reply(len(plain)) == (0, 3, plain)
    assert_dmcrypt(image, key, offset, plain)


def minor_faults(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[7])


def test_bursts_of_large_writes_reuse_the_servers_buffers(encrypted):
    """Sequential 1 MiB writes, four in flight (the bench's seq write): each burst takes
    four 1 MiB ciphertext buffers (the staged payloads) and frees them. The server keeps
    that memory (`runtime.tune_allocator`) instead of faulting it in again for every
    burst. Untuned, this test saw 67,456 faults; in the bench one instance of two took
    ~930,000 faults per 6-second run and wrote at half the speed."""
    srv, _, _ = encrypted
    payload = nbd.Buffer.from_bytearray(bytearray(random.Random(5).randbytes(MiB)))
    h = nbd.NBD()
    h.connect_uri(srv.uri("enc"))

    def bursts(n: int) -> None:
        for b in range(n):
            cookies = [h.aio_pwrite(payload, ((b * 4 + i) % (SIZE // MiB)) * MiB) for i in range(4)]
            while h.aio_in_flight() > 0:
                h.poll(-1)
            assert all(h.aio_command_completed(c) for c in cookies)

    try:
        bursts(8)  # the first bursts build the heap
        before = minor_faults(srv.proc.pid)
        bursts(64)
        faults = minor_faults(srv.proc.pid) - before
    finally:
        h.shutdown()
    touched = 64 * 4 * MiB // 4096  # pages of the stage buffers
    assert faults < touched // 20, f"{faults} page faults for {touched} buffer pages"
