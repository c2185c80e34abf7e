"""A throwaway single-node Ceph cluster, for the tests and the demo of disks on RBD.

One monitor, no manager and one OSD whose object store is memory (`memstore`), all
bound to 127.0.0.1 (or `addr`, a network namespace's own, for clients on other test
hosts), all files in one directory: `ceph.conf`, the keyrings, the daemons' data,
sockets, logs and pid files. Nothing global is read or written (no /etc/ceph, no
/var/lib/ceph, no systemd): every command gets `--conf` and `--keyring` explicitly.

Why this shape:
- memstore, not bluestore on a file: its mkfs is instant and its memory is only what is
  written (bluestore's caches start at hundreds of MiB), and a test cluster's data need
  not outlive it.
- No ceph-mgr: RBD I/O needs the monitor and the OSD only (PGs are created by the
  monitor). Without a manager `ceph -s` shows the PGs as unknown and warns; readiness is
  therefore checked with real I/O (a probe object written to the pool), never with
  health.
- One pool, size 1 and min_size 1 (`mon allow pool size one`), so one OSD serves I/O.
- The client the tests and the server use (`client.nbdserver`) has only `profile rbd`
  on the one pool; its keyring is 0600, like the admin one.

    with CephCluster(tmp_dir) as ceph:
        ceph.conf, ceph.keyring, ceph.client_id, ceph.pool

Scripts use the same code: `python -m tests.helpers.ceph start DIR` starts a cluster
and prints its `ceph.conf`'s path, `python -m tests.helpers.ceph stop DIR` stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

POOL = "rbd"
CLIENT = "nbdserver"            # the client name: client.nbdserver
START_TIMEOUT = 120.0           # mon + OSD up and the pool writable, on a loaded machine
STOP_TIMEOUT = 30.0
MEMSTORE_BYTES = 4 << 30        # a cap, not an allocation: memstore holds what is written

TOOLS = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool")


def missing() -> str | None:
    """None if a cluster can be started here, else why not (for a skip message)."""
    gone = [t for t in TOOLS if shutil.which(t) is None]
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        gone.append("python3-rados/python3-rbd")
    return f"Ceph is not installed ({', '.join(gone)}): scripts/lib/bootstrap.sh installs it" if gone else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONF = """\
[global]
fsid = {fsid}
mon host = v2:{addr}:{port}
public addr = {addr}
cluster addr = {addr}
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {dir}/run
admin socket = {dir}/run/$cluster-$name.asok
pid file = {dir}/run/$cluster-$name.pid
log file = {dir}/log/$cluster-$name.log
crash dir = {dir}/crash
keyring = {dir}/$cluster.$name.keyring
# One OSD: replicas of one, placed on it whatever the CRUSH failure domain says.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# A test cluster is small and short-lived: fewer threads and less memory per daemon.
osd op num shards = 1
osd op num threads per shard = 2
osd memory target = 939524096
mon data avail warn = 1
mon data avail crit = 0
osd max object name len = 256
osd max object namespace len = 64

[mon]
mon data = {dir}/mon/$cluster-$id
keyring = {dir}/mon/$cluster-$id/keyring
auth allow insecure global id reclaim = false
mon cluster log file = {dir}/log/$cluster.log

[osd]
osd data = {dir}/osd/$cluster-$id
keyring = {dir}/osd/$cluster-$id/keyring
osd objectstore = memstore
memstore device bytes = {memstore}
osd check max object name len on startup = false
# A client that died (a server killed -9) keeps its watch on an image, and so the image's
# exclusive lock, until this many seconds pass without a ping (default 30): a test that
# kills a server then waits that long to remove or take over its image. Live clients
# ping their watches on every tick of their objecter (5 s).
osd client watch timeout = 10
"""


class CephCluster:
    """One monitor and one memstore OSD in `workdir`; `start()` returns once the pool
    takes writes; `stop()` ends the daemons and removes the data."""

    def __init__(self, workdir: Path | str, *, pool: str = POOL, client: str = CLIENT,
                 addr: str = "127.0.0.1"):
        self.dir = Path(workdir).resolve()
        self.addr = addr  # another host's address when started in a network namespace
        self.pool = pool
        self.client_id = client
        self.conf = self.dir / "ceph.conf"
        self.admin_keyring = self.dir / "ceph.client.admin.keyring"
        self.keyring = self.dir / f"ceph.client.{client}.keyring"
        self.port = 0
        self.started_seconds = 0.0

    # -- commands

    def _run(self, *argv: str, timeout: float = 60.0) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """The `ceph` command as client.admin (--connect-timeout: never wait forever)."""
        return self._run("ceph", "--conf", str(self.conf), "--keyring", str(self.admin_keyring),
                         "--name", "client.admin", "--connect-timeout", "30", *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        """The `rbd` command as the server's own client, on this cluster."""
        return self._run("rbd", "--conf", str(self.conf), "--keyring", str(self.keyring),
                         "--id", self.client_id, *args, timeout=timeout)

    def read_image(self, name: str, offset: int, length: int) -> bytes:
        """An image's bytes as Ceph stores them, read through a client of its own: what
        tests check the server's writes against, apart from the server."""
        import rados
        import rbd
        client = rados.Rados(conffile=str(self.conf), rados_id=self.client_id,
                             conf={"keyring": str(self.keyring)})
        client.connect(timeout=30)
        try:
            with client.open_ioctx(self.pool) as io, rbd.Image(io, name, read_only=True) as image:
                return image.read(offset, length)
        finally:
            client.shutdown()

    def _daemon(self, kind: str, ident: str, *extra: str) -> None:
        """Start a daemon in the foreground of its own process group: the pid file is
        how stop() finds it, from this process or from another (`stop DIR`)."""
        log = open(self.dir / "log" / f"{kind}.{ident}.out", "ab")
        proc = subprocess.Popen([f"ceph-{kind}", "-f", "--conf", str(self.conf), "-i", ident, *extra],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        # The daemon writes the same file once it runs; written here too, so a daemon
        # that dies early, or is stopped before it got that far, is still found.
        (self.dir / "run" / f"ceph-{kind}.{ident}.pid").write_text(f"{proc.pid}\n")

    # -- life cycle

    def start(self) -> CephCluster:
        started = time.monotonic()
        if self.dir.exists() and any(self.dir.iterdir()):
            raise RuntimeError(f"{self.dir} is not empty: stop that cluster first")
        for sub in ("run", "log", "crash", "mon", "osd/ceph-0"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.port = _free_port()
        fsid = str(uuid.uuid4())
        self.conf.write_text(CONF.format(fsid=fsid, port=self.port, dir=self.dir, memstore=MEMSTORE_BYTES,
                                         addr=self.addr))
        try:
            self._make_mon(fsid)
            self._daemon("mon", "a")
            self._make_osd()
            self._daemon("osd", "0")
            self._make_pool()
        except BaseException:
            self.stop()
            raise
        self.started_seconds = time.monotonic() - started
        return self

    def _keyring(self, path: Path, name: str, *caps: str) -> None:
        self._run("ceph-authtool", "--create-keyring", str(path), "--gen-key", "-n", name, *caps)
        os.chmod(path, 0o600)

    def _make_mon(self, fsid: str) -> None:
        mon_keyring = self.dir / "mon.keyring"
        self._keyring(mon_keyring, "mon.", "--cap", "mon", "allow *")
        self._keyring(self.admin_keyring, "client.admin", "--cap", "mon", "allow *",
                      "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        self._run("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.admin_keyring))
        monmap = self.dir / "monmap"
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                  f"[v2:{self.addr}:{self.port}]", str(monmap))
        self._run("ceph-mon", "--conf", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
                  "--keyring", str(mon_keyring))

    def _make_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_keyring = self.dir / "osd" / "ceph-0" / "keyring"
        self._keyring(osd_keyring, "osd.0")
        secret = self._run("ceph-authtool", str(osd_keyring), "-p", "-n", "osd.0").strip()
        secrets = self.dir / "osd-secrets.json"
        fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"cephx_secret": secret}, f)
        # The first command of the cluster: it waits for the monitor to answer.
        osd_id = self.ceph("osd", "new", osd_uuid, "-i", str(secrets), timeout=START_TIMEOUT).strip()
        secrets.unlink()
        if osd_id != "0":
            raise RuntimeError(f"expected osd.0, the monitor made osd.{osd_id}")
        self._run("ceph-osd", "--conf", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
                  "--keyring", str(osd_keyring))

    def _make_pool(self) -> None:
        self.ceph("osd", "pool", "create", self.pool, "8", "8", "replicated")
        self.ceph("osd", "pool", "set", self.pool, "size", "1", "--yes-i-really-mean-it")
        self.ceph("osd", "pool", "application", "enable", self.pool, "rbd")
        self.ceph("auth", "get-or-create", f"client.{self.client_id}", "mon", "profile rbd",
                  "osd", f"profile rbd pool={self.pool}", "-o", str(self.keyring))
        os.chmod(self.keyring, 0o600)
        self._wait_writable()

    def _wait_writable(self) -> None:
        """The pool takes a write: the OSD booted and its PGs peered. Real I/O, since
        without a manager the cluster's health cannot say so."""
        import rados
        deadline = time.monotonic() + START_TIMEOUT
        cluster = rados.Rados(conffile=str(self.conf), rados_id=self.client_id,
                              conf={"keyring": str(self.keyring), "rados_osd_op_timeout": "5",
                                    "rados_mon_op_timeout": "5"})
        cluster.connect(timeout=30)
        try:
            with cluster.open_ioctx(self.pool) as io:
                while True:
                    try:
                        io.write_full("probe", b"ready")
                        io.remove_object("probe")
                        return
                    except (rados.TimedOut, rados.Error) as e:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"pool {self.pool} not writable in {START_TIMEOUT}s: {e}; "
                                               f"see {self.dir / 'log'}") from None
                    time.sleep(0.2)
        finally:
            cluster.shutdown()

    def pids(self) -> list[int]:
        out = []
        for pidfile in sorted((self.dir / "run").glob("*.pid")):
            try:
                out.append(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                continue
        return out

    def rss_kib(self) -> dict[str, int]:
        """Resident memory of each daemon (for the record of what the cluster costs)."""
        out = {}
        for pidfile in sorted((self.dir / "run").glob("*.pid")):
            try:
                status = Path(f"/proc/{int(pidfile.read_text())}/status").read_text()
            except (OSError, ValueError):
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    out[pidfile.stem] = int(line.split()[1])
        return out

    def stop(self) -> None:
        """End every daemon and remove the data. SIGKILL straight away: memstore's data
        goes with the process anyway, and an OSD's clean shutdown takes seconds."""
        pids = self.pids()
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    # A daemon started here is our child until it is reaped: waitpid, or it lingers as
    # a zombie that kill(0) still finds.
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.ceph", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("dir", help="the cluster's directory (empty or absent for start)")
    ap.add_argument("--addr", default="127.0.0.1", help="the address the daemons bind (start)")
    args = ap.parse_args(argv)
    cluster = CephCluster(args.dir, addr=args.addr)
    if args.action == "stop":
        cluster.stop()
        return
    reason = missing()
    if reason:
        sys.exit(reason)
    cluster.start()
    print(f"CEPH_CONF={cluster.conf}\nCEPH_KEYRING={cluster.keyring}\nCEPH_ID={cluster.client_id}\n"
          f"CEPH_POOL={cluster.pool}\nCEPH_START_SECONDS={cluster.started_seconds:.1f}", flush=True)


if __name__ == "__main__":
    main()
