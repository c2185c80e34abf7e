"""Byte-granular requests (doc/proto.md, "Size constraints").

A client that connects with NBD_OPT_EXPORT_NAME, or with an NBD_OPT_GO that does not ask
for NBD_INFO_BLOCK_SIZE, has agreed to no block size, and the spec says the server
SHOULD then accept requests of any alignment. They are served on the plain file and on
the encrypted disk (XtsLayer's read-modify-write of partial sectors), where the file must
still hold exactly dm-crypt's format. A client whose GO asked for the block sizes has
promised to keep them: a misaligned request from it is still EINVAL.
"""

from __future__ import annotations

import random
import struct

import pytest

from nbdserver.protocol.constants import (
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_SIMPLE_REPLY_MAGIC,
)
from tests.helpers.images import dek_file, dmcrypt_sector
from tests.helpers.nbdraw import RawClient

pytestmark = pytest.mark.timeout(120)
S = 4096
SIZE = 16 << 20

# (offset, length, flags): inside one sector, two writes sharing a sector (in flight at
# once: their read-modify-writes must not lose each other), across a sector boundary
# (FUA: on a worker), both ends partial over several sectors, a large one with partial
# ends, and the last bytes of the disk.
WRITES = [
    (4095, 1, 0),
    (7, 513, 0),
    (8190, 3, NBD_CMD_FLAG_FUA),
    (3 * S - 100, S + 200, 0),
    (5 * S + 1, 2 * S - 2, 0),
    (64 * S + 333, 200 * 1024 + 5, 0),
    (SIZE - 5, 5, 0),
]


@pytest.fixture(params=["plain", "xts", "plain-direct", "xts-direct"])
def disk(request, server_factory, tmp_path):
    """(server, image path, key or None): a 16 MiB export named `disk`. `-direct`:
    cache=none, O_DIRECT, where the plain file does its own read-modify-write of
    partial 4 KiB blocks (the encrypted one's are whole sectors already)."""
    image = tmp_path / "disk.img"
    spec = f"disk={image},size={SIZE}"
    if request.param.endswith("-direct"):
        spec += ",cache=none"
    key = None
    if request.param.startswith("xts"):
        key, keyfile = dek_file(tmp_path)
        spec += f",key={keyfile}"
    return server_factory([spec]), image, key


def export_name_client(srv) -> RawClient:
    c = RawClient(srv.address)
    c.start()
    c.export_name("disk")
    assert c.size == SIZE
    return c


def replies(c: RawClient, reads: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    """Simple replies until every cookie of `reads` (cookie -> read length; 0 for
    commands without data) is answered, in whatever order they come."""
    out: dict[int, tuple[int, bytes]] = {}
    while len(out) < len(reads):
        magic, err, cookie = struct.unpack(">IIQ", c.recv_exact(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC and cookie in reads and cookie not in out
        out[cookie] = (err, c.recv_exact(reads[cookie]) if reads[cookie] and not err else b"")
    return out


def read(c: RawClient, offset: int, length: int, cookie: int = 900) -> bytes:
    c.request(NBD_CMD_READ, offset, length, cookie=cookie)
    err, data = replies(c, {cookie: length})[cookie]
    assert err == 0, f"READ {length} at {offset}: error {err}"
    return data


def assert_file_holds(image, key, model: bytearray, touched: set[int]) -> None:
    """Plain: the file is the model. Encrypted: every touched sector is dm-crypt's
    aes-xts-plain64 (4096-byte sectors, tweak = sector number) of the model's bytes."""
    stored = image.read_bytes()
    assert len(stored) == SIZE
    if key is None:
        assert stored == model
        return
    for s in sorted(touched):
        want = dmcrypt_sector(key, s, bytes(model[s * S:(s + 1) * S]))
        assert stored[s * S:(s + 1) * S] == want, f"sector {s} is not dm-crypt's ciphertext"


def sectors(offset: int, length: int) -> range:
    return range(offset // S, (offset + length - 1) // S + 1)


def test_export_name_client_reads_and_writes_at_any_byte(disk):
    srv, image, key = disk
    rng = random.Random(5)
    model = bytearray(SIZE)
    touched: set[int] = set()
    with export_name_client(srv) as c:
        # All in flight at once: the server may run them in any order, so none overlap.
        sent = {}
        for i, (off, n, flags) in enumerate(WRITES, start=1):
            data = rng.randbytes(n)
            model[off:off + n] = data
            touched.update(sectors(off, n))
            c.request(NBD_CMD_WRITE, off, n, flags=flags, cookie=i, payload=data)
            sent[i] = 0
        assert all(err == 0 for err, _ in replies(c, sent).values())

        for off, n, _ in WRITES:
            assert read(c, off, n) == model[off:off + n], f"{n} bytes at {off}"
        for off, n in [(1, 9 * S), (3 * S - 101, S + 202), (64 * S + 300, 210 * 1024),
                       (SIZE - S - 3, S + 3), (4095, 2)]:
            assert read(c, off, n) == model[off:off + n], f"{n} bytes at {off}"

        # Zeroing by the byte too: part of a sector that holds data on both sides.
        c.request(NBD_CMD_WRITE_ZEROES, 3 * S - 50, 20, cookie=50)
        assert replies(c, {50: 0})[50][0] == 0
        model[3 * S - 50:3 * S - 30] = bytes(20)
        assert read(c, 3 * S - 60, 40) == model[3 * S - 60:3 * S - 20]

        c.request(NBD_CMD_FLUSH, cookie=60)
        assert replies(c, {60: 0})[60][0] == 0
        assert_file_holds(image, key, model, touched)
    srv.assert_healthy()


def test_go_without_block_size_request_is_served_unaligned(disk):
    srv, _, _ = disk
    with RawClient.connected(srv.address, "disk") as c:
        c.request(NBD_CMD_WRITE, 4095, 3, cookie=1, payload=b"abc")
        assert replies(c, {1: 0})[1][0] == 0
        assert read(c, 4094, 5) == b"\0abc\0"


def test_client_that_asked_for_block_sizes_gets_einval_when_misaligned(disk):
    srv, _, _ = disk
    with RawClient.connected(srv.address, "disk", block_size=True) as c:
        for cookie, (cmd, off, n) in enumerate([(NBD_CMD_READ, 4095, 1), (NBD_CMD_READ, 0, 513),
                                                (NBD_CMD_WRITE, 7, 512), (NBD_CMD_WRITE, 0, 1),
                                                (NBD_CMD_WRITE_ZEROES, 100, 512)], start=1):
            payload = b"\xff" * n if cmd == NBD_CMD_WRITE else b""
            c.request(cmd, off, n, cookie=cookie, payload=payload)
            assert replies(c, {cookie: 0})[cookie][0] == NBD_EINVAL, (cmd, off, n)
        # Nothing of the refused writes landed, and aligned requests are served.
        assert read(c, 0, 2 * S) == bytes(2 * S)
        c.request(NBD_CMD_WRITE, 512, 512, cookie=20, payload=b"\x01" * 512)
        assert replies(c, {20: 0})[20][0] == 0
        assert read(c, 0, 1024) == bytes(512) + b"\x01" * 512
    srv.assert_healthy()
