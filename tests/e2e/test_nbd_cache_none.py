"""cache=none: the disk's file opened with O_DIRECT (nbdserver/backend.py).

The mode changes where the bytes pass (not through the page cache), never what lands in
the file: a disk written in one mode reads back the same in the other, and holds exactly
dm-crypt's aes-xts-plain64 either way. That O_DIRECT is really in effect is read from
the kernel itself (/proc/PID/fdinfo of the server's descriptor on the file). A file
system that cannot do direct I/O (ramfs) stops the start with a message that says so.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from tests.helpers.images import dek_file, dmcrypt_sector
from tests.helpers.servers import BaselineServer

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

pytestmark = pytest.mark.timeout(120)
S = 4096
SIZE = 16 << 20
O_DIRECT = 0o40000  # x86-64's; fdinfo's flags are octal


def open_flags(pid: int, path) -> list[int]:
    """The flags of every descriptor process `pid` holds on `path`."""
    path = os.path.realpath(path)
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except FileNotFoundError:  # closed meanwhile
            continue
        found.append(int(info["flags"].strip(), 8))
    return found


def test_o_direct_is_in_effect_exactly_where_cache_none_says(server_factory, tmp_path):
    _, keyfile = dek_file(tmp_path)
    images = {name: tmp_path / f"{name}.img" for name in ("inherits", "own", "buffered")}
    srv = server_factory([f"inherits={images['inherits']},size={SIZE},key={keyfile}",
                          f"own={images['own']},size={SIZE},cache=none",
                          f"buffered={images['buffered']},size={SIZE},key={keyfile},cache=writeback"],
                         extra_args=["--cache", "none"])
    for name, direct in (("inherits", True), ("own", True), ("buffered", False)):
        flags = open_flags(srv.pid, images[name])
        assert flags, f"the server holds no descriptor on {name}"
        assert all(bool(f & O_DIRECT) == direct for f in flags), (name, [oct(f) for f in flags])


def connect_any_alignment(uri: str):
    """A libnbd handle that asks for no block size (so the server takes any byte, as
    doc/proto.md says it SHOULD) and does not itself refuse unaligned requests."""
    h = nbd.NBD()
    h.set_request_block_size(False)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(uri)
    return h


def write_mixed(uri: str, rng: random.Random) -> dict[int, bytes]:
    """Writes of every shape in flight at once: staged (>= 64 KiB), 4 KiB, and unaligned
    ones (read-modify-write). Returns {offset: data}, non-overlapping."""
    shapes = [(0, 1 << 20), (2 << 20, 64 << 10), (3 << 20, S), (4 << 20, 96 << 10),
              (5 << 20, 200 << 10), ((6 << 20) + 513, 5000), ((7 << 20) + 7, 1), (SIZE - S, S)]
    data = {off: rng.randbytes(n) for off, n in shapes}
    h = connect_any_alignment(uri)
    try:
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off) for off, d in data.items()]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)
        h.flush()
    finally:
        h.shutdown()
    return data


def read_back(uri: str, data: dict[int, bytes]) -> None:
    h = connect_any_alignment(uri)
    try:
        for off, d in data.items():
            assert h.pread(len(d), off) == d, f"{len(d)} bytes at {off}"
    finally:
        h.shutdown()


@pytest.mark.parametrize("first,second", [("none", "writeback"), ("writeback", "none")])
def test_one_on_disk_format_whatever_the_mode(tmp_path, first, second):
    key, keyfile = dek_file(tmp_path)
    image = tmp_path / "enc.img"
    spec = f"enc={image},size={SIZE},key={keyfile}"
    with BaselineServer(tmp_path, [f"{spec},cache={first}"], name="first") as srv:
        data = write_mixed(srv.uri("enc"), random.Random(first))
        srv.assert_healthy()
    # The file is dm-crypt's, sector by sector, wherever whole sectors were written.
    stored = image.read_bytes()
    plain = bytearray(SIZE)
    for off, d in data.items():
        plain[off:off + len(d)] = d
    for off, d in data.items():
        for s in range(-(-off // S), (off + len(d)) // S):
            assert stored[s * S:(s + 1) * S] == dmcrypt_sector(key, s, bytes(plain[s * S:(s + 1) * S])), \
                f"sector {s}"
    with BaselineServer(tmp_path, [f"{spec},cache={second}"], name="second") as srv:
        read_back(srv.uri("enc"), data)
        srv.assert_healthy()


@pytest.fixture
def ramfs(tmp_path):
    """A directory on ramfs, a file system without direct I/O (O_DIRECT: EINVAL); tmpfs
    ignores O_DIRECT on this kernel instead of refusing it. Needs mount privileges."""
    where = tmp_path / "ramfs"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount ramfs here: {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_file_system_without_o_direct_stops_the_start_with_a_reason(tmp_path, ramfs):
    image = ramfs / "disk.img"
    srv = BaselineServer(tmp_path, [f"disk={image},size={SIZE}"], extra_args=["--cache", "none"])
    with pytest.raises(RuntimeError, match="exited") as e:
        srv.start()
    assert "export 'disk': cache=none needs O_DIRECT" in str(e.value)
    assert "Traceback" not in srv.stderr_text()
    # The same file serves with the page cache, as the message advises.
    with BaselineServer(tmp_path, [f"disk={image},size={SIZE},cache=writeback"], name="wb") as ok:
        read_back(ok.uri("disk"), {0: bytes(S)})
