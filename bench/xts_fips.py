"""The XTS engine's own speed in each mode: `python -m bench.xts_fips [--rounds N]`.

Modes, each in a fresh process (a process's engine is in one mode for its life):
- default: the pinned OpenSSL's default provider (AVX-512/VAES XTS where the CPU has it);
- fips: the FIPS provider of that same release (`.cache/fips/pinned`), as `serve --fips`;
- fips-3.0: the FIPS provider built from an OpenSSL 3.0 source (`.cache/fips/system`)
  loaded into the engine, as a validated 3.0.9 module would be: what the 3.0 series'
  provider, which has no VAES XTS code, costs.
Rounds are interleaved (A, B, C, A, B, C, ...) so that the load of a shared machine falls
on every mode alike; each round encrypts then decrypts SIZE bytes of 4 KiB sectors in
place (best of PASSES passes), and the median over rounds per mode is printed in MB per
second of the calling thread's CPU time (the engine runs on that thread): on a shared
machine wall time measures the neighbours. A figure, not a test: say the load with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SIZE = 64 << 20
SECTOR = 4096
PASSES = 3  # per operation and round; the best is kept (others' load only slows a pass)
MODES = ("default", "fips", "fips-3.0")


def run_one(mode: str) -> dict[str, float]:
    import tempfile
    from pathlib import Path

    from daemonkit.fips import DEFAULT_DIR, tree
    from nbdserver.crypto import _xts
    if mode != "default":
        provider = tree(DEFAULT_DIR, "pinned" if mode == "fips" else "system")
        config = provider.write_config(Path(tempfile.mkdtemp()), "engine.cnf")
        _xts.enable_fips(str(config), str(provider.modules))
    key = bytes(range(64))
    engine = _xts.Engine(key, SECTOR)
    buf = bytearray(SIZE)
    engine.encrypt(buf, buf, 0)  # pages faulted in, contexts made: not part of the figure
    out = {}
    for op in ("encrypt", "decrypt"):
        fn = getattr(engine, op)
        best = 0.0
        for _ in range(PASSES):
            start = time.thread_time()
            fn(buf, buf, 0)
            best = max(best, SIZE / (time.thread_time() - start) / 1e6)
        out[op] = best
    # One 4 KiB sector per call, as a 4 KiB request costs: the per-call work (IV reset,
    # the provider's own checks) shows here and not in a 64 MiB call.
    view, calls = memoryview(buf), SIZE // SECTOR // 4
    best = 0.0
    for _ in range(PASSES):
        start = time.thread_time()
        for i in range(calls):
            sector = view[i * SECTOR:(i + 1) * SECTOR]
            engine.decrypt(sector, sector, i)
        best = max(best, calls * SECTOR / (time.thread_time() - start) / 1e6)
    out["decrypt-4k-calls"] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="the XTS engine in the default and FIPS modes")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    ops = ("encrypt", "decrypt", "decrypt-4k-calls")
    results: dict[str, dict[str, list[float]]] = {m: {op: [] for op in ops} for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            r = subprocess.run([sys.executable, "-m", "bench.xts_fips", "--one", mode],
                               capture_output=True, text=True, check=True)
            for op, v in json.loads(r.stdout).items():
                results[mode][op].append(v)
    print(f"AES-256-XTS, 4 KiB sectors, {SIZE >> 20} MiB in place, median of {args.rounds} "
          "interleaved rounds (MB per CPU second)")
    for mode in MODES:
        enc, dec, calls = (statistics.median(results[mode][op]) for op in ops)
        print(f"  {mode:9s} encrypt {enc:8.0f}  decrypt {dec:8.0f}  decrypt, a call per 4 KiB {calls:8.0f}")


if __name__ == "__main__":
    main()
