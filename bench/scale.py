"""Thousands of disks on one server (issue 22): a scale scenario, measured, never asserted.

    python -m bench.scale --disks 1000 --attached 200 [--workdir DIR] [--json OUT]

Both daemons run as real processes (tests/helpers/platform.Stack); one encryption set on
a customer key holds N disks of 1 MiB, C of them attached over NBD with libnbd. Printed:

- creation rate (disks per second, `disk create --count` in batches of 1000);
- server RSS per disk, unattached and attached (each the growth over the state before,
  divided by the disks added or attached);
- the first NBD_OPT_GO of each attached disk (p50, p99): it unwraps the DEK;
- revocation: from the key service's answer to `key disable` until every one of the C
  attached disks has failed a read with EIO; reopen: from `key enable` until every one
  serves again on the same handle;
- restart: from `nbdserver serve` starting to its READY line, to the first disk served,
  and until C clients reconnecting at once are all served.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BATCH = 1000  # the API's largest --count


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def pct(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _eio(h) -> bool:
    import nbd
    try:
        h.pread(4096, 0)
        return False
    except nbd.Error:
        return True


def _all(handles, cond, timeout: float) -> float:
    """Seconds until cond(h) held for every handle, checked one after another."""
    start = time.monotonic()
    for h in handles:
        while not cond(h):
            if time.monotonic() - start > timeout:
                raise TimeoutError("not every disk reached the state in time")
    return time.monotonic() - start


def run(disks: int, attached: int, workdir: Path) -> dict:
    import nbd

    from tests.helpers.platform import Stack
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nbd_args = ["--max-connections-per-peer", str(max(1024, 2 * attached)),
                "--max-connections", str(max(4096, 2 * attached))]
    stack = Stack(workdir, lease=3600, nbd_args=nbd_args).start()
    nb = stack.nb
    assert nb is not None, "Stack.start() starts nbdserver"
    out: dict = {"disks": disks, "attached": attached}
    try:
        stack.customer_key("scale", "k1", "des-scale")
        base = rss_kib(nb.pid)
        t0 = time.monotonic()
        for b in range(0, disks, BATCH):
            stack.nbdserver("disk", "create", f"s{b // BATCH}", "--size", "1M", "--des", "des-scale",
                            "--count", str(min(BATCH, disks - b)), "--quiet")
        created = time.monotonic() - t0
        names = [f"s{b // BATCH}-{i}" for b in range(0, disks, BATCH)
                 for i in range(min(BATCH, disks - b))]
        out["create_per_s"] = round(disks / created, 1)
        unattached = rss_kib(nb.pid)
        out["rss_mib"] = {"empty": round(base / 1024, 1), "unattached": round(unattached / 1024, 1)}
        out["rss_kib_per_unattached_disk"] = round((unattached - base) / disks, 2)

        handles, go = [], []
        for n in names[:attached]:
            h = nbd.NBD()
            t = time.monotonic()
            h.connect_uri(stack.nbd_uri(n))
            go.append(time.monotonic() - t)
            h.pread(4096, 0)
            handles.append(h)
        out["first_go_ms"] = {"p50": round(1000 * statistics.median(go), 2),
                              "p99": round(1000 * pct(go, 0.99), 2)}
        att = rss_kib(nb.pid)
        out["rss_mib"]["attached"] = round(att / 1024, 1)
        out["rss_kib_per_attached_disk"] = round((att - unattached) / max(1, attached), 2)

        revoke, reopen = [], []
        for _ in range(3):
            status, body = stack.ks_api("PATCH", "/vaults/scale/keys/k1", {"attributes": {"enabled": False}})
            assert status == 200, body
            revoke.append(_all(handles, _eio, 60))
            status, body = stack.ks_api("PATCH", "/vaults/scale/keys/k1", {"attributes": {"enabled": True}})
            assert status == 200, body
            reopen.append(_all(handles, lambda h: not _eio(h), 120))
        for key, samples in (("revoke_all_attached_s", revoke), ("reopen_all_attached_s", reopen)):
            out[key] = {"samples": [round(x, 3) for x in samples], "max": round(max(samples), 3)}
        for h in handles:
            h.shutdown()

        stack.stop_nbdserver()
        t0 = time.monotonic()
        stack.start_nbdserver(same_ports=True)
        out["restart_ready_s"] = round(time.monotonic() - t0, 3)
        h = nbd.NBD()
        h.connect_uri(stack.nbd_uri(names[-1]))
        h.pread(4096, 0)
        out["restart_first_served_s"] = round(time.monotonic() - t0, 3)
        h.shutdown()

        def reconnect(n):
            h = nbd.NBD()
            h.connect_uri(stack.nbd_uri(n))
            h.pread(4096, 0)
            return h
        t1 = time.monotonic()
        with ThreadPoolExecutor(max_workers=64) as pool:
            storm = list(pool.map(reconnect, names[:attached]))
        out["reconnect_storm_s"] = round(time.monotonic() - t1, 3)
        for h in storm:
            h.shutdown()
    finally:
        stack.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--disks", type=int, default=1000)
    ap.add_argument("--attached", type=int, default=200)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    if not 0 <= a.attached <= a.disks:
        ap.error("--attached must be between 0 and --disks")
    with tempfile.TemporaryDirectory(prefix="nbd-scale-") as tmp:
        out = run(a.disks, a.attached, a.workdir or Path(tmp))
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
