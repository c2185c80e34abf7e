"""Benchmark (not collected by pytest): wrap/unwrap throughput and latency, and
revocation latency (disable -> key.disabled received on the change stream).

    .venv/bin/python tests/keyservice/bench_keyservice.py [--seconds 5] [--concurrency 8]
"""
import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from keyservice.client import KeyServiceClient  # noqa: E402

from conftest import Daemon  # noqa: E402


async def hammer(client, kid, op, seconds, wrapped):
    lat, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        if op == "wrap":
            await client.wrap_key(kid, os.urandom(64))
        else:
            await client.unwrap_key(kid, wrapped)
        lat.append(time.perf_counter() - t)
    return lat


async def main(args, daemon):
    async with KeyServiceClient(daemon.url, daemon.admin) as admin:
        await admin.create_vault("bench", location="l", subscription="s")
        bundle = await admin.create_key("bench", "k", size=args.size)
        kid = bundle["key"]["kid"]
        _, wrapped = await admin.wrap_key(kid, os.urandom(64))
        clients = [KeyServiceClient(daemon.url, daemon.admin) for _ in range(args.concurrency)]
        for op in ("wrap", "unwrap"):
            runs = await asyncio.gather(*(hammer(c, kid, op, args.seconds, wrapped) for c in clients))
            lat = sorted(x for r in runs for x in r)
            print(f"{op:6s} RSA-{args.size} x{args.concurrency}: {len(lat) / args.seconds:7.0f} ops/s, "
                  f"p50 {statistics.median(lat) * 1000:.1f} ms, p99 {lat[int(len(lat) * .99)] * 1000:.1f} ms")
        for c in clients:
            await c.close()
        delays = []
        stream = admin.events(since=0)
        async for e in stream:
            if e["type"] == "key.created":
                break
        for i in range(args.revocations):
            enabled = i % 2 == 1
            t = time.perf_counter()
            await admin.request("PATCH", "/vaults/bench/keys/k", {"attributes": {"enabled": enabled}})
            async for e in stream:
                if e["type"] == ("key.enabled" if enabled else "key.disabled"):
                    break
            delays.append(time.perf_counter() - t)
        await stream.aclose()
        delays.sort()
        print(f"revocation (PATCH sent -> event received), {len(delays)} runs: "
              f"p50 {statistics.median(delays) * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", type=int, default=3072)
    p.add_argument("--revocations", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp) / "data").start()
        try:
            asyncio.run(main(args, d))
        finally:
            d.stop()
            d.close()
