"""`python -m bench` (via `scripts/bench`): parse the options, run the harness, write the reports."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import report, targets, workloads
from .harness import Bench, Settings

ROOT = Path(__file__).resolve().parent.parent


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        n = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M)") from None
    # Every workload's block size must divide the image, and XTS works in 4 KiB sectors.
    if n <= 0 or n % (1 << 20):
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 1 MiB: {text!r}")
    return n


def positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return v
    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="fio over NBD against several servers side by side; writes "
                    "bench/results.{json,md,png}. `scripts/bench --pytest` runs the "
                    "pytest-benchmark microbenchmarks instead.")
    ap.add_argument("--targets", default="all",
                    help=f"comma-separated, in display order (default all: {','.join(targets.REGISTRY)})")
    ap.add_argument("--workloads", default="all",
                    help=f"comma-separated (default all: {','.join(workloads.SUITE)})")
    ap.add_argument("--runs", type=positive(int), help="repetitions of each workload (default 3)")
    ap.add_argument("--runtime", "--seconds", type=positive(float),
                    help="seconds per fio run, after the ramp (default 5)")
    ap.add_argument("--ramp", type=float, default=1.0,
                    help="seconds of warm-up left out of each run (default 1)")
    ap.add_argument("--size", type=parse_size, help="image size (default 1G; 256M with --quick)")
    ap.add_argument("--reference", default="plain", help="target the ratios compare to (default plain)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run, 2 s each, 256 MiB image")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench",
                    help="where results.* go (default bench/)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "work",
                    help="scratch space for images; emptied afterwards (default bench/work/)")
    ap.add_argument("--list", action="store_true", help="list targets and workloads, then exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.list:
        for name, cls in targets.REGISTRY.items():
            print(f"target   {name:18} {cls.description}")
        for w in workloads.SUITE.values():
            print(f"workload {w.name:18} {w.description}")
        return 0
    try:
        chosen_targets = targets.select(args.targets)
        chosen_workloads = workloads.select(args.workloads)
    except ValueError as e:
        ap.error(str(e))
    settings = Settings(
        runs=args.runs or (1 if args.quick else 3),
        runtime=args.runtime or (2 if args.quick else 5),
        ramp=args.ramp,
        size=args.size or ((256 << 20) if args.quick else (1 << 30)),
        reference=args.reference,
        workdir=args.work_dir,
    )
    if settings.reference not in chosen_targets:
        print(f"note: reference {settings.reference!r} is not among the targets; no ratios", file=sys.stderr)

    # SIGTERM unwinds like Ctrl-C, so every server is stopped and the scratch images removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        results = Bench(chosen_targets, chosen_workloads, settings).run()
    except RuntimeError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = report.write_all(results, args.out_dir)
    print(report.markdown(results))
    for kind, path in paths.items():
        print(f"{kind:5} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
