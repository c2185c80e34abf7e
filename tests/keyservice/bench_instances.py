"""Benchmark (not collected by pytest): key-service throughput on SQLite, on PostgreSQL
with one instance, and on PostgreSQL with two instances sharing the database (issue 15).

Every set-up is started once, then measured in turns (A/B interleaved: round 1 of each,
round 2 of each, ...), so a shared machine's load falls on all of them alike. Two
operations: unwrapKey (RSA work plus a group-committed audit entry) and a key update
(PATCH of its expiry: a change, its event and its audit entry, each a write transaction).

    .venv/bin/python tests/keyservice/bench_instances.py [--seconds 3] [--rounds 3] [--concurrency 8]
"""
import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from keyservice.client import KeyServiceClient  # noqa: E402
from tests.helpers.postgres import PostgresServer  # noqa: E402

from conftest import Daemon  # noqa: E402


def start_setups(root: Path, pg: PostgresServer) -> dict[str, list[Daemon]]:
    setups = {"sqlite x1": [Daemon(root / "sqlite").start()]}
    for label, n in (("postgresql x1", 1), ("postgresql x2", 2)):
        dsn = pg.create_database(label.replace(" ", "_"))
        first = Daemon(root / f"{label[-2:]}a")
        first.extra_args = ["--state", dsn, "--base-url", first.url]
        daemons = [first.start()]
        for i in range(1, n):
            d = Daemon(root / f"{label[-2:]}{i}")
            d.data_dir.mkdir(mode=0o700)
            for name in ("master-key", "admin.credential"):
                shutil.copy2(first.data_dir / name, d.data_dir / name)
            d.extra_args = first.extra_args
            daemons.append(d.start())
        setups[label] = daemons
    return setups


async def prepare(d: Daemon) -> tuple[str, bytes]:
    async with KeyServiceClient(d.url, d.admin) as admin:
        await admin.create_vault("bench", location="l", subscription="s")
        kid = (await admin.create_key("bench", "k", size=2048))["key"]["kid"]
        _, wrapped = await admin.wrap_key(kid, os.urandom(64))
    return kid, wrapped


async def hammer(client, op, kid, wrapped, seconds) -> int:
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if op == "unwrap":
            await client.unwrap_key(kid, wrapped)
        else:
            await client.request("PATCH", "/vaults/bench/keys/k", {"attributes": {"exp": 4_000_000_000 + n}})
        n += 1
    return n


async def measure(daemons: list[Daemon], op: str, kid: str, wrapped: bytes, args) -> float:
    clients = [KeyServiceClient(daemons[i % len(daemons)].url, daemons[0].admin)
               for i in range(args.concurrency)]
    try:
        counts = await asyncio.gather(*(hammer(c, op, kid, wrapped, args.seconds) for c in clients))
    finally:
        for c in clients:
            await c.close()
    return sum(counts) / args.seconds


async def run(args, setups) -> None:
    prepared = {label: await prepare(ds[0]) for label, ds in setups.items()}
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for op in ("unwrap", "update"):
            for label, daemons in setups.items():
                kid, wrapped = prepared[label]
                results.setdefault((op, label), []).append(await measure(daemons, op, kid, wrapped, args))
    print(f"{args.rounds} rounds x {args.seconds:g} s, {args.concurrency} clients, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    for (op, label), rates in results.items():
        print(f"{op:7s} {label:14s} median {statistics.median(rates):7.0f} ops/s   "
              f"runs: {', '.join(f'{r:.0f}' for r in rates)}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ks-bench-"))
    with PostgresServer() as pg:
        setups = start_setups(root, pg)
        try:
            asyncio.run(run(args, setups))
        finally:
            for daemons in setups.values():
                for d in daemons:
                    d.stop()
                    d.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
