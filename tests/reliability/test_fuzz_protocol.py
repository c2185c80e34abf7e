"""Coverage-guided fuzzing of the NBD protocol parser (atheris), bounded for CI.

Each target of tests/reliability/fuzz_protocol.py runs in its own process (libFuzzer
owns the process) for a bounded time; any failed property or exception is a crash
input written to the work directory, shown here. The in-memory hypothesis fuzz of the
same code lives in tests/unit/test_handshake.py and test_transmission.py, the socket
fuzz in tests/e2e/test_nbd_fuzz.py; this adds libFuzzer's coverage feedback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers.servers import ROOT

pytest.importorskip("atheris")

CI_SECONDS = 20
SOAK_SECONDS = int(os.environ.get("RELIABILITY_FUZZ_SECONDS", "600"))


def seeds(target: str, corpus) -> None:
    """Valid sessions to start from: libFuzzer mutates toward the branches near them."""
    import struct

    from nbdserver.protocol.constants import IHAVEOPT, NBD_REQUEST_MAGIC
    if target == "transmission":
        for cmd in range(12):
            for flags in (0, 1, 2, 4, 8, 16):
                length = 4096 if cmd != 1 else 512
                body = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, 7, 4096, length)
                body += b"\x5a" * 512 if cmd == 1 else b""
                (corpus / f"seed-{cmd}-{flags}").write_bytes(b"\x87" + body * 2)
    else:
        for option in range(1, 11):
            data = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
            msg = struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, option, len(data)) + data
            (corpus / f"seed-{option}").write_bytes(b"\x00\x10" + msg)


def fuzz(target: str, seconds: int, workdir) -> dict:
    corpus = workdir / f"corpus-{target}"
    corpus.mkdir(exist_ok=True)
    seeds(target, corpus)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "tests.reliability.fuzz_protocol", target,
                        f"-max_total_time={seconds}", "-rss_limit_mb=1024", "-seed=1",
                        "-len_control=0", "-max_len=8192",
                        f"-artifact_prefix={workdir}/", str(corpus)],
                       capture_output=True, text=True, cwd=workdir, env=env, timeout=seconds + 120)
    crashes = [p.name for p in workdir.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-"))]
    assert r.returncode == 0 and not crashes, f"{target}: {crashes}\n{r.stderr[-4000:]}"
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", r.stderr)
    runs, cov, ft, corp = map(int, done[-1]) if done else (0, 0, 0, 0)
    stats = {"target": target, "seconds": seconds, "runs": runs, "cov": cov, "features": ft,
             "corpus": corp}
    print(f"\nfuzz-protocol: {stats}")
    return stats


@pytest.mark.parametrize("target", ["handshake", "transmission"])
def test_fuzz_protocol_bounded(target, tmp_path):
    assert fuzz(target, CI_SECONDS, tmp_path)["runs"] > 1000


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("target", ["handshake", "transmission"])
def test_fuzz_protocol_long(target, tmp_path):
    fuzz(target, SOAK_SECONDS, tmp_path)
