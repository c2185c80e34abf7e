"""Two platform hosts on shared engines, in network namespaces (tests/host/netlab.py): the
lab of the two-host scenario (issue 15), for its test and for `./scripts/demo --cluster`.

    with ClusterLab(workdir) as lab:
        a, b = lab.start_host("a"), lab.start_host("b")
        a.keyservice("vault", "create", ...)       # the CLIs run on that host
        lab.fio("a", "d1", "--rw=write", ...)        # fio on the client host

Hosts `a` and `b` each run `keyservice serve` and `nbdserver serve`; `store` runs a
throwaway Ceph cluster (tests/helpers/ceph.py, bound to that host's address); `cli` is
the client. One throwaway PostgreSQL (tests/helpers/postgres.py) holds both services'
state: it listens on a unix socket only, which every namespace reaches through the file
system, so the lab needs no change to it.

Why this shape:
- Each host's NBD server talks to the key service on its own host, at
  http://127.0.0.1:8443 (each namespace has its own loopback), and both key services
  say that same --base-url: a key URL (kid) is then one service's wherever it is used,
  and the platform's rule that a set's key is on its own key service holds on both.
- Instance `b` of each service gets `a`'s master key (and the key service's admin
  credential), as docs/operations.md says for instances on one database: what one seals
  in the shared state, the other opens.
- NBD crosses the network, so it is TLS, with one certificate naming both hosts; the
  platform API stays on each host's loopback, where its CLI runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers import postgres
from tests.helpers.ceph import CephCluster
from tests.helpers.ceph import missing as ceph_missing
from tests.helpers.platform import CliFailed, KeyServiceProcess, NbdServerProcess, stop_daemons
from tests.helpers.servers import ROOT
from tests.host.netlab import TestNetwork

HOSTS = ("a", "b", "store", "cli")
KS_PORT, NBD_PORT, API_PORT = 8443, 10809, 8080
CLI_TIMEOUT = 120.0
CEPH_START_TIMEOUT = 180.0
FIO_USER = 65534  # nobody: see ClusterLab._make_fio_home


def missing() -> str | None:
    """None if the lab can run here, else why not (for a skip message)."""
    if os.geteuid() != 0:
        return "the cluster lab needs root (network namespaces)"
    gone = [t for t in ("ip", "fio") if shutil.which(t) is None]
    if gone:
        return f"not installed: {', '.join(gone)}"
    return ceph_missing() or postgres.missing()


class ClusterHost:
    """One platform host: its key service and NBD server, and its CLIs."""

    def __init__(self, lab: ClusterLab, name: str):
        self.lab, self.name = lab, name
        self.dir = lab.workdir / name
        self.ks_dir, self.nb_dir = self.dir / "ks", self.dir / "nb"
        self.ks: KeyServiceProcess | None = None
        self.nb: NbdServerProcess | None = None
        self._stopped_logs: list[str] = []

    @property
    def addr(self) -> str:
        return self.lab.net.addr(self.name)

    def start(self) -> ClusterHost:
        self.dir.mkdir(parents=True, exist_ok=True)
        ks = KeyServiceProcess(self.dir, self.ks_dir, KS_PORT,
                               ["--state", self.lab.ks_dsn, "--base-url", f"http://127.0.0.1:{KS_PORT}"])
        ks.argv = self.lab.net.argv(self.name, ks.argv)
        self.ks = ks.start()
        return self.start_nbdserver()

    def start_nbdserver(self) -> ClusterHost:
        """The host's NBD server (again, after a kill: same data directory and ports)."""
        assert self.ks is not None, "the key service first"
        lab, ceph = self.lab, self.lab.ceph
        lab.ceph_ready()
        if self.nb is not None:
            self._stopped_logs.append(self.nb.stderr_text())
        nb = NbdServerProcess(self.dir, self.nb_dir, self.ks, lease=lab.lease, grace=lab.grace,
                              api_port=API_PORT,
                              extra_args=["--state", lab.nb_dsn, "--disk-lease-seconds", lab.disk_lease,
                                          "--storage", f"rbd:{ceph.pool}", "--ceph-conf", ceph.conf,
                                          "--ceph-id", ceph.client_id, "--ceph-keyring", ceph.keyring,
                                          "--tls-dir", lab.tls_dir, "--io-processes", "0"])
        nb.argv[nb.argv.index("--nbd-listen") + 1] = f"{self.addr}:{NBD_PORT}"
        nb.argv = lab.net.argv(self.name, [str(a) for a in nb.argv])
        self.nb = nb.start()
        return self

    def kill_nbdserver(self) -> float:
        """kill -9 of the host's NBD server; time.monotonic() of the kill."""
        assert self.nb is not None
        self.nb.kill()
        return time.monotonic()

    @property
    def ks_url(self) -> str:
        """The key service as this host's NBD server and CLIs reach it (and every kid's base)."""
        return f"http://127.0.0.1:{KS_PORT}"

    @property
    def ready_line(self) -> str:
        assert self.nb is not None, "start() first"
        return self.nb.ready_line

    def uri(self, disk: str) -> str:
        """The disk's NBD URI for the client host (TLS: certificates in the lab's tls_dir)."""
        return f"nbds://{self.addr}:{NBD_PORT}/{disk}"

    @property
    def env(self) -> dict:
        assert self.ks is not None and self.nb is not None, "start() first"
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env.update(PYTHONPATH=str(ROOT), KEYSERVICE_URL=self.ks.url,
                   KEYSERVICE_CREDENTIAL=str(self.ks.admin_credential),
                   NBDSERVER_API=f"http://127.0.0.1:{API_PORT}", NBDSERVER_TOKEN_FILE=str(self.nb.token_file))
        return env

    def keyservice(self, *args):
        return self._cli("keyservice", args)

    def nbdserver(self, *args):
        return self._cli("nbdserver.cli", args)

    def _cli(self, module: str, args):
        self.lab.show(self.name, [module.split(".")[0], *args])
        argv = self.lab.net.argv(self.name, [sys.executable, "-m", module, *args])
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=ROOT,
                           timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise CliFailed(argv, r)
        return json.loads(r.stdout) if r.stdout.strip() else None

    def customer_disk(self, disk: str, size: str, *, subscription: str) -> dict:
        """The seed's workflow on this host: vault `cust`, RSA key `k1`, encryption set
        `des1` on it, the set's grant, then `disk` (on the lab's RBD pool); its view."""
        self.keyservice("vault", "create", "cust", "--location", "local", "--subscription",
                        subscription, "--enable-purge-protection")
        self.keyservice("key", "create", "cust", "k1", "--size", "2048")
        des = self.nbdserver("des", "create", "des1", "--key-url", f"{self.ks_url}/vaults/cust/keys/k1")
        self.keyservice("policy", "set", "cust", "--object-id", des["identity"]["objectId"],
                        "--key-permissions", "get,wrapKey,unwrapKey")
        return self.nbdserver("disk", "create", disk, "--size", size, "--des", "des1", "--quiet")

    def close(self) -> None:
        stop_daemons(self.nb, self.ks)

    def logs(self) -> str:
        """Both daemons' stderr, NBD servers killed before included."""
        return "\n".join(self._stopped_logs + [d.stderr_text() for d in (self.ks, self.nb)
                                                if d is not None and d.proc is not None])


class ClusterLab:
    """The namespaces, Ceph, PostgreSQL and the hosts; everything goes on exit."""

    def __init__(self, workdir: Path, *, lease: float = 1.0, grace: float = 30.0, disk_lease: float = 3.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lease, self.grace, self.disk_lease = lease, grace, disk_lease
        self.net = TestNetwork(list(HOSTS))
        self.pg: postgres.PostgresServer | None = None
        self.ceph = CephCluster(self.workdir / "ceph", addr=self.net.addr("store"))
        self.tls_dir = self.workdir / "nbd-tls"
        self.fio_home: Path | None = None
        self._ceph_proc: subprocess.Popen | None = None
        self._ceph_began = 0.0
        self.hosts: dict[str, ClusterHost] = {}
        self.ks_dsn = self.nb_dsn = ""
        self.costs: dict[str, float] = {}  # seconds each engine took to start
        self.echo: Callable[[str], None] | None = None  # the demo prints each command here

    def show(self, host: str, argv: list) -> None:
        if self.echo is not None:
            self.echo(f"[{host}]$ {' '.join(map(str, argv))}")

    def start(self) -> ClusterLab:
        """Ceph starts in the background while the rest is made: it is the slowest part,
        and only the first NBD server needs it (`ceph_ready`)."""
        try:
            self.net.start()
            self._ceph_began = time.monotonic()
            self._ceph_proc = subprocess.Popen(
                self.net.argv("store", [sys.executable, "-m", "tests.helpers.ceph", "start",
                                        self.ceph.dir, "--addr", self.ceph.addr]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            began = time.monotonic()
            self.pg = postgres.PostgresServer().start()
            self.ks_dsn = self.pg.create_database("keyservice")
            self.nb_dsn = self.pg.create_database("platform")
            self.costs["postgresql"] = time.monotonic() - began
            subprocess.run([sys.executable, "-m", "nbdserver.cli", "tls", "init", str(self.tls_dir),
                            "--host", self.net.addr("a"), "--host", self.net.addr("b")],
                           check=True, capture_output=True, cwd=ROOT)
            self._make_fio_home()
        except BaseException:
            self.close()
            raise
        return self

    def ceph_ready(self) -> None:
        """Wait for the Ceph cluster (its daemons run in the store host's namespace, bound to
        its address, in sessions of their own: they outlive the helper that made them)."""
        if self._ceph_proc is None or "ceph" in self.costs:
            return
        try:
            _, err = self._ceph_proc.communicate(timeout=CEPH_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._ceph_proc.kill()
            _, err = self._ceph_proc.communicate()
        if self._ceph_proc.returncode != 0:
            raise RuntimeError(f"Ceph did not start in the store namespace: {err[-3000:]}")
        self.costs["ceph"] = time.monotonic() - self._ceph_began

    def _make_fio_home(self) -> None:
        """fio's nbd engine gives libnbd no certificate directory, so libnbd looks in its
        default one: /etc/pki/libnbd for root, which we do not touch, and
        $HOME/.pki/libnbd for anyone else. fio therefore runs as `nobody` with a HOME of
        its own holding the client's certificate (outside pytest's 0700 root directory,
        which nobody cannot traverse)."""
        home = Path(tempfile.mkdtemp(prefix="cluster-fio-"))
        self.fio_home = home
        certs = home / ".pki" / "libnbd"
        certs.mkdir(parents=True)
        for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
            shutil.copy2(self.tls_dir / f, certs / f)
        for d, _, files in os.walk(home):
            for p in [d, *(os.path.join(d, f) for f in files)]:
                os.chown(p, FIO_USER, FIO_USER)

    def start_host(self, name: str) -> ClusterHost:
        """Host `name`'s two daemons. Hosts after the first get the first's master keys and
        the key service's admin credential before they start (one service, one platform)."""
        host = ClusterHost(self, name)
        if self.hosts:
            first = next(iter(self.hosts.values()))
            for d in (host.ks_dir, host.nb_dir):
                d.mkdir(parents=True, mode=0o700, exist_ok=True)
            for f in ("master-key", "admin.credential"):
                shutil.copy2(first.ks_dir / f, host.ks_dir / f)
            shutil.copy2(first.nb_dir / "master.key", host.nb_dir / "master.key")
        self.hosts[name] = host
        return host.start()

    # -- the client host
    def fio(self, server: str, disk: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """fio's nbd engine on the client host against `disk` as host `server` serves it."""
        assert self.fio_home is not None, "start() first"
        self.show("cli", ["fio", "--ioengine=nbd", f"--uri={self.hosts[server].uri(disk)}", *args])
        argv = self.net.argv("cli", ["setpriv", f"--reuid={FIO_USER}", f"--regid={FIO_USER}", "--clear-groups",
                                     "fio", "--name=cluster", "--ioengine=nbd",
                                     f"--uri={self.hosts[server].uri(disk)}", *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              cwd=self.fio_home, env={"HOME": str(self.fio_home), "PATH": os.environ["PATH"]})

    def first_read(self, server: str, disk: str, timeout: float) -> float:
        """Connect to `disk` on `server` from the client host until a read succeeds (every
        0.1 s, for at most `timeout` s); time.monotonic() of that read (one clock for every
        namespace), or an error if none did."""
        probe = ("import nbd, sys, time\n"
                 "end = time.monotonic() + float(sys.argv[2])\n"
                 "while True:\n"
                 "    try:\n"
                 "        h = nbd.NBD(); h.set_tls_certificates(sys.argv[3])\n"
                 "        h.connect_uri(sys.argv[1]); h.pread(4096, 0)\n"
                 "        print(time.monotonic()); break\n"
                 "    except nbd.Error as e:\n"
                 "        if time.monotonic() > end: sys.exit(f'no read: {e}')\n"
                 "        time.sleep(0.1)\n")
        r = subprocess.run(self.net.argv("cli", [sys.executable, "-c", probe, self.hosts[server].uri(disk),
                                                 timeout, self.tls_dir]),
                           capture_output=True, text=True, timeout=timeout + 30)
        if r.returncode != 0:
            raise AssertionError(f"{disk} on host {server}: {r.stderr.strip()[-2000:]}")
        return float(r.stdout.strip())

    def close(self) -> None:
        for host in reversed(list(self.hosts.values())):
            host.close()
        if self._ceph_proc is not None and self._ceph_proc.poll() is None:
            self._ceph_proc.kill()  # still starting: its daemons' pid files are written
            self._ceph_proc.communicate()
        self.ceph.stop()  # by its pid files: nothing to do if it never started
        if self.pg is not None:
            self.pg.stop()
        self.net.close()
        if self.fio_home is not None:
            shutil.rmtree(self.fio_home, ignore_errors=True)

    def __enter__(self) -> ClusterLab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
