"""Independent clients against the server process: qemu-img, qemu-io, nbdcopy, fio."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers.images import DISK_SIZE, need_tool, sha256_file

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20


def run(*argv, timeout: float = 120) -> str:
    need_tool(argv[0])
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def random_image(path, size: int, holes: bool = True) -> None:
    """An image of random data with a few holes, so copies must keep both right."""
    with open(path, "wb") as f:
        f.truncate(size)
        for mib in range(0, size // MiB, 3 if holes else 1):
            f.seek(mib * MiB)
            f.write(os.urandom(MiB))


def qemu_nbd(srv, export: str) -> str:
    return f"nbd://{srv.host}:{srv.port}/{export}"


def test_qemu_img_convert_compare_and_map(server, tmp_path):
    src = tmp_path / "src.raw"
    random_image(src, DISK_SIZE)
    uri = qemu_nbd(server, "disk")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back))
    assert sha256_file(back) == sha256_file(src)


def test_qemu_img_map_shows_holes_after_trim_and_zero(server):
    uri = qemu_nbd(server, "disk")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "flush", uri)
    run("qemu-io", "-f", "raw", "-c", "discard 1M 1M", "-c", "write -z -u 4M 2M", uri)
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri))
    def at(offset):
        return next(e for e in extents if e["start"] <= offset < e["start"] + e["length"])
    assert at(0)["data"] is True
    assert at(1 * MiB)["data"] is False and at(1 * MiB)["zero"] is True
    assert at(2 * MiB)["data"] is True
    assert at(4 * MiB)["data"] is False and at(4 * MiB)["zero"] is True
    assert at(8 * MiB)["data"] is False  # never written
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 1M",
              "-c", "read -P 0x5a 2M 2M", "-c", "read -P 0 4M 2M", "-c", "read -P 0x5a 6M 2M", uri)
    assert "Pattern verification failed" not in out


def test_qemu_io_aio_and_fua(server):
    uri = qemu_nbd(server, "disk")
    out = run("qemu-io", "-f", "raw",
              "-c", "aio_write -P 0x11 0 64k", "-c", "aio_write -P 0x22 1M 512", "-c", "aio_flush",
              "-c", "write -f -P 0x33 2M 4k", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 1M 512",
              "-c", "read -P 0x33 2M 4k", uri)
    assert "Pattern verification failed" not in out and "error" not in out.lower()


def test_nbdcopy_round_trip_keeps_checksum(server, tmp_path):
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    random_image(src, DISK_SIZE)
    run("nbdcopy", "--flush", str(src), server.uri("disk"))
    run("nbdcopy", server.uri("disk"), str(back))
    assert sha256_file(back) == sha256_file(src)
    # Several connections and requests in flight, too.
    run("nbdcopy", "--connections=4", "--requests=32", server.uri("disk"), str(back))
    assert sha256_file(back) == sha256_file(src)


def test_fio_verify_crc32c(server):
    need_tool("fio")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout:
        pytest.skip("this fio has no nbd engine")
    out = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri('disk')}",
              "--rw=randwrite", "--bs=4k", "--bsrange=512-64k", "--size=16M", "--iodepth=16",
              "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
              "--output-format=json",
              timeout=150)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
