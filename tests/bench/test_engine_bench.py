"""Microbenchmarks of the XTS sector encryption, one thread.

Disabled by default (pyproject addopts has --benchmark-disable: each body then runs
once, as a smoke test). Measure with:

    .venv/bin/python -m pytest tests/bench/test_engine_bench.py --benchmark-enable

Targets: >= 3 GB/s on 1 MiB requests and >= 1.5 GB/s on single 4 KiB sectors, encrypt
and decrypt, through `_xts.Engine`. Throughput (from the median) is in extra_info as
GB/s. No assertion is made on speed: the suite has no timing assertions.
"""

import os

import pytest

from nbdserver.backend import FileBackend
from nbdserver.crypto import SECTOR_SIZE as S
from nbdserver.crypto import XtsLayer, XtsSectorCipher, generate_dek
from nbdserver.crypto._xts import Engine

SIZES = {"4KiB": S, "1MiB": 1 << 20}


def throughput(benchmark, nbytes):
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_engine_in_place(benchmark, op, size):
    n = SIZES[size]
    engine = Engine(generate_dek(), S)
    buf = bytearray(os.urandom(n))
    fn = getattr(engine, op)
    benchmark.group = f"engine {size}"
    benchmark(fn, buf, buf, 123456)
    throughput(benchmark, n)


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_engine_encrypt_out_of_place(benchmark, size):
    n = SIZES[size]
    engine = Engine(generate_dek(), S)
    src, dst = os.urandom(n), bytearray(n)
    benchmark.group = f"engine {size}"
    benchmark(engine.encrypt, src, dst, 123456)
    throughput(benchmark, n)


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_cipher_decrypt_with_hole_check(benchmark, size):
    """The read path: XtsSectorCipher.decrypt(holes=True) on real ciphertext."""
    n = SIZES[size]
    cipher = XtsSectorCipher(generate_dek())
    buf = bytearray(os.urandom(n))
    benchmark.group = f"engine {size}"
    benchmark(lambda: cipher.decrypt(buf, buf, 77, holes=True))
    throughput(benchmark, n)
    cipher.close()


@pytest.mark.parametrize("op", ["pread", "pwrite"])
@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_layer_over_tmpfs_file(benchmark, op, size, tmp_path):
    """Whole layer over a FileBackend (page cache), for context: includes the syscalls."""
    n = SIZES[size]
    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(base, f"xts-bench-{os.getpid()}")
    layer = XtsLayer(FileBackend(path, size=4 << 20), generate_dek())
    try:
        buf = bytearray(os.urandom(n))
        layer.pwrite(buf, 0)
        fn = getattr(layer, op)
        benchmark.group = f"layer {size}"
        benchmark(fn, buf, 0)
        throughput(benchmark, n)
    finally:
        layer.close()
        os.unlink(path)
