"""The baseline runner serving exports on RBD (`NAME=rbd:POOL/IMAGE`, --ceph-conf ...),
to real NBD clients: libnbd, qemu-img, fio. An encrypted export's image is checked
against dm-crypt's format sector by sector, read apart from the server through librbd:
Ceph holds ciphertext only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.helpers.ceph import CephCluster
from tests.helpers.images import dmcrypt_sector, need_tool
from tests.helpers.servers import ROOT, BaselineServer

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")

pytestmark = pytest.mark.timeout(240)
S = 4096
KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB


@dataclass
class RbdExports:
    server: BaselineServer
    cluster: CephCluster
    encrypted: str  # the image names of the exports `enc` and `plain`
    plain: str
    key: bytes


def ceph_args(cluster) -> list[str]:
    return ["--ceph-conf", str(cluster.conf), "--ceph-id", cluster.client_id,
            "--ceph-keyring", str(cluster.keyring)]


@pytest.fixture
def exports(ceph_cluster, rbd_image, server_factory, tmp_path):
    key = os.urandom(64)
    keyfile = tmp_path / "dek.key"
    keyfile.write_bytes(key)
    keyfile.chmod(0o600)
    enc, plain = rbd_image(SIZE), rbd_image(SIZE)
    pool = ceph_cluster.pool
    srv = server_factory([f"enc=rbd:{pool}/{enc},key={keyfile}", f"plain=rbd:{pool}/{plain}"],
                         extra_args=ceph_args(ceph_cluster))
    return RbdExports(srv, ceph_cluster, enc, plain, key)


def assert_dmcrypt(e: RbdExports, offset: int, plain: bytes) -> None:
    stored = e.cluster.read_image(e.encrypted, offset, len(plain))
    for i in range(0, len(plain), S):
        sector = (offset + i) // S
        assert stored[i:i + S] == dmcrypt_sector(e.key, sector, plain[i:i + S]), \
            f"sector {sector} in Ceph is not the ciphertext of what was written"


def test_libnbd_write_read_flush_trim_zero_on_an_encrypted_rbd_export(exports):
    h = nbd.NBD()
    h.connect_uri(exports.server.uri("enc"))
    try:
        assert h.get_size() == SIZE and h.can_flush() and h.can_trim() and h.can_zero()
        data = {0: os.urandom(MiB), 5 * MiB: os.urandom(64 * KiB), 9 * MiB: os.urandom(4 * KiB),
                12 * MiB + 512: os.urandom(3072)}  # 512-byte units: read-modify-write
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off) for off, d in data.items()]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)
        h.flush()
        for off, d in data.items():
            assert h.pread(len(d), off) == d
        h.trim(64 * KiB, 5 * MiB)
        h.zero(4 * KiB, 9 * MiB, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(64 * KiB, 5 * MiB) == bytes(64 * KiB)
        assert h.pread(4 * KiB, 9 * MiB) == bytes(4 * KiB)
        assert h.pread(64 * KiB, 0) == data[0][:64 * KiB]
        h.flush()
    finally:
        h.shutdown()
    assert_dmcrypt(exports, 0, data[0][:64 * KiB])
    # Trimmed: Ceph holds zeros there (a hole), which the layer reads as zeros.
    assert exports.cluster.read_image(exports.encrypted, 5 * MiB, 64 * KiB) == bytes(64 * KiB)
    exports.server.assert_healthy()


def test_block_status_on_rbd_shows_holes_where_nothing_was_written(exports):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(exports.server.uri("plain"))
    try:
        h.pwrite(b"x" * 4096, 8 * MiB)
        seen = []
        h.block_status(SIZE, 0, lambda ctx, off, entries, err: seen.extend(entries) or 0)
    finally:
        h.shutdown()
    lengths, flags = seen[0::2], seen[1::2]
    assert sum(lengths) == SIZE
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    state = {s: f for s, f in zip(starts, flags, strict=True)}
    assert state[0] & nbd.STATE_HOLE  # objects never written
    data_at = [s for s, f in state.items() if not f & nbd.STATE_HOLE]
    assert data_at and all(s <= 8 * MiB < s + lengths[starts.index(s)] for s in data_at)


def run(*argv, timeout: float = 180) -> str:
    need_tool(argv[0])
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_qemu_img_convert_onto_an_encrypted_rbd_export(exports, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for mib in range(0, SIZE // MiB, 3):  # data with holes between
            f.seek(mib * MiB)
            f.write(os.urandom(MiB))
    uri = exports.server.uri("enc")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    assert_dmcrypt(exports, 3 * MiB, src.read_bytes()[3 * MiB:4 * MiB])


def test_fio_verify_on_an_encrypted_rbd_export(exports):
    need_tool("fio")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout:
        pytest.skip("this fio has no nbd engine")
    out = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={exports.server.uri('enc')}",
              "--rw=randwrite", "--bs=4k", "--bsrange=512-64k", "--size=16M", "--iodepth=16",
              "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
              "--output-format=json")
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def start_failing(tmp_path, argv: list[str]) -> str:
    """The runner's exit message for a start that must fail."""
    p = subprocess.run([sys.executable, "-m", "nbdserver.baseline", "--listen", "127.0.0.1:0", *argv],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return p.stderr


def test_bad_rbd_exports_fail_the_start_with_a_message(ceph_cluster, tmp_path):
    pool = ceph_cluster.pool
    assert "needs --ceph-conf" in start_failing(tmp_path, [f"d=rbd:{pool}/x"])
    assert "rbd:POOL/IMAGE" in start_failing(tmp_path, [*ceph_args(ceph_cluster), "d=rbd:nopool"])
    assert "cache= is for files" in start_failing(tmp_path, [*ceph_args(ceph_cluster),
                                                             f"d=rbd:{pool}/x,cache=none"])
    err = start_failing(tmp_path, [*ceph_args(ceph_cluster), f"d=rbd:{pool}/absent"])
    assert "export 'd'" in err and "absent" in err


def test_a_server_killed_after_answering_writes_lost_none_of_them(ceph_cluster, rbd_image, server_factory):
    """librbd's cache is off: a write is answered once the OSDs have it. With the cache
    on, writes after the first flush would be answered from memory and die with the
    process."""
    name = rbd_image(SIZE)
    srv = server_factory([f"plain=rbd:{ceph_cluster.pool}/{name}"], extra_args=ceph_args(ceph_cluster))
    h = nbd.NBD()
    h.connect_uri(srv.uri("plain"))
    written = {i * 256 * KiB: os.urandom(64 * KiB) for i in range(64)}
    h.flush()  # librbd's cache, were it on, would turn from write-through to write-back here
    for off, data in written.items():
        h.pwrite(data, off)  # answered: promised, though not flushed
    srv.proc.kill()
    srv.proc.wait(timeout=30)
    del h  # its connection died with the server
    stored = ceph_cluster.read_image(name, 0, 16 * MiB)
    for off, data in written.items():
        assert stored[off:off + len(data)] == data, f"the write at {off} was lost"
