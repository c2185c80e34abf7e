"""nbdserver.runtime.tune_allocator: freed request buffers stay with the process.

The pattern is the server's own under sequential 1 MiB writes at queue depth 4: a burst
of 1 MiB buffers (payloads, ciphertext stages) allocated, then all freed. With glibc's
dynamic thresholds the freed top of the heap goes back to the kernel after each burst
and the next burst faults every page in again; tuned, it is reused."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys
    from nbdserver.runtime import tune_allocator
    if sys.argv[1] == "tuned":
        assert tune_allocator()
    def burst():
        bufs = [bytearray(1 << 20) for _ in range(8)]
        del bufs
    burst(); burst()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        burst()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
PAGES = 10 * 8 * (1 << 20) // 4096  # pages the ten bursts touch


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def test_tuned_allocator_reuses_freed_request_buffers():
    control = faults("default")
    if control < PAGES // 2:
        pytest.skip(f"this C library kept the buffers untuned too ({control} faults)")
    assert faults("tuned") < PAGES // 20
