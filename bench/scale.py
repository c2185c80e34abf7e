"""Thousands of disks on one server (issue 22): a scale scenario, measured, never asserted.

    python -m bench.scale --disks 1000 --attached 200 [--runs 3] [--workdir DIR] [--json OUT]

Both daemons run as real processes (tests/helpers/platform.Stack); one encryption set on
a customer key holds N disks of 1 MiB, C of them attached over NBD with libnbd. Printed:

- creation rate (disks per second, `disk create --count` in batches of 1000);
- server RSS per disk, unattached and attached (each the growth over the state before,
  divided by the disks added or attached);
- the first NBD_OPT_GO of each attached disk (p50, p99): it unwraps the DEK;
- revocation: from the key service's answer to `key disable` until every one of the C
  attached disks has failed a read with EIO; reopen: from `key enable` until every one
  serves again on the same handle (each `--runs` times: p50, p99 and the samples);
- the platform's own share of each (from nbdserver's log, `platform/access.py`): from
  the moment it learned of the change (the key service's event reached it) until every
  disk was locked, and until every DEK was wiped; for a reopen, until every disk served;
- the CPU seconds each daemon used for a reopen: on a shared host the wall-clock figures
  follow the other load, these much less (nbdserver's own process only: with
  `--io-processes` above 1 its workers are not counted);
- restart: from `nbdserver serve` starting to its READY line, to the first disk served,
  and until C clients reconnecting at once are all served.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BATCH = 1000  # the API's largest --count
# A client waiting for a disk to change state asks again after this pause: a client that
# asked without one kept a core busy (its own and the server's answers to it), a core the
# 2-core host of the figures took from the daemons being measured. Adds at most this
# much to a figure.
POLL = 0.001

# nbdserver's log lines with the platform's share (platform/access.py)
_REVOKED = re.compile(r"revocation of \S+: (\d+) disk\(s\) locked ([\d.]+) ms and wiped ([\d.]+) ms")
_REOPENED = re.compile(r"(\d+) disk\(s\) of \S+: key access restored, serving again ([\d.]+) ms")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
            time.sleep(POLL)
    return time.monotonic() - start


def _summary(samples, digits: int = 3) -> dict:
    return {"p50": round(statistics.median(samples), digits), "p99": round(pct(samples, 0.99), digits),
            "samples": [round(x, digits) for x in samples]}


class LogCursor:
    """nbdserver's log lines written since the last call."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.seen = len(daemon.stderr_text())

    def new(self) -> str:
        text = self.daemon.stderr_text()
        out, self.seen = text[self.seen:], len(text)
        return out


def _platform_share(log, pattern, disks: int, timeout: float = 30.0) -> tuple[float, ...]:
    """The figures (ms) of the log line for `disks` disks, once nbdserver wrote it."""
    from tests.helpers.servers import wait_until
    text = [""]

    def logged():
        text[0] += log.new()
        return next((tuple(float(x) for x in m.groups()[1:]) for m in pattern.finditer(text[0])
                     if int(m[1]) == disks), None)
    return wait_until(logged, timeout, interval=0.05, what=f"nbdserver's log line for {disks} disks")


def run(disks: int, attached: int, workdir: Path, runs: int = 3, io_processes: int | None = None) -> dict:
    import nbd

    from tests.helpers.platform import Stack
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nbd_args = ["--max-connections-per-peer", str(max(1024, 2 * attached)),
                "--max-connections", str(max(4096, 2 * attached))]
    if io_processes is not None:
        nbd_args += ["--io-processes", str(io_processes)]
    stack = Stack(workdir, lease=3600, nbd_args=nbd_args).start()
    nb = stack.nb
    assert nb is not None, "Stack.start() starts nbdserver"
    out: dict = {"disks": disks, "attached": attached, "runs": runs, "io_processes": io_processes}
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

        revoke, reopen, locked, wiped, served, ks_cpu, nb_cpu = [], [], [], [], [], [], []
        log = LogCursor(nb)
        for _ in range(runs):
            status, body = stack.ks_api("PATCH", "/vaults/scale/keys/k1", {"attributes": {"enabled": False}})
            assert status == 200, body
            revoke.append(_all(handles, _eio, 60))
            # Every disk of the key is locked, the unattached ones too; C of them had a DEK.
            lock_ms, wipe_ms = _platform_share(log, _REVOKED, disks)
            locked.append(lock_ms)
            wiped.append(wipe_ms)
            cpu = cpu_s(stack.ks.pid), cpu_s(nb.pid)
            status, body = stack.ks_api("PATCH", "/vaults/scale/keys/k1", {"attributes": {"enabled": True}})
            assert status == 200, body
            reopen.append(_all(handles, lambda h: not _eio(h), 120))
            ks_cpu.append(cpu_s(stack.ks.pid) - cpu[0])
            nb_cpu.append(cpu_s(nb.pid) - cpu[1])
            served.append(_platform_share(log, _REOPENED, disks)[0])
        out["revoke_all_attached_s"] = _summary(revoke)
        out["revoke_platform_ms"] = {"locked": _summary(locked, 1), "wiped": _summary(wiped, 1)}
        out["reopen_all_attached_s"] = _summary(reopen)
        out["reopen_platform_ms"] = {"served": _summary(served, 1)}
        out["reopen_cpu_s"] = {"keyservice": _summary(ks_cpu, 2), "nbdserver": _summary(nb_cpu, 2)}
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
    ap.add_argument("--runs", type=int, default=3, help="revoke/reopen cycles (p50, p99 over them)")
    ap.add_argument("--io-processes", type=int, help="nbdserver serve --io-processes (default: its own)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    if not 0 < a.attached <= a.disks:
        ap.error("--attached must be between 1 and --disks")
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="nbd-scale-") as tmp:
        out = run(a.disks, a.attached, a.workdir or Path(tmp), a.runs, a.io_processes)
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
