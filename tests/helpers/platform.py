"""The whole disk platform as real processes: the key service and nbdserver, and their CLIs.

`Stack` starts `keyservice serve` (ready on its sd_notify READY=1) and `nbdserver serve`
(ready on its `READY nbd=... api=...` line), both with their own data directories under
one work directory, and offers what a test or a demo needs on top:

    with Stack(tmp_path, lease=1, grace=3) as stack:
        cmk = stack.customer_key("cust", "k1", "des1")   # vault, key, DES, grant
        stack.nbdserver("disk", "create", "d1", "--size", "16M", "--des", "des1")
        h = stack.connect("d1")                           # a libnbd handle
        stack.keyservice("key", "disable", "cust", "k1")
        wait_for_eio(h)

The CLIs run as subprocesses with `stack.env` (KEYSERVICE_URL, KEYSERVICE_CREDENTIAL,
NBDSERVER_API, NBDSERVER_TOKEN_FILE); `keyservice(...)` and `nbdserver(...)` return the
parsed JSON and raise `CliFailed` (with the exit code and stderr) on refusal, unless
`check=False`, which returns the `subprocess.CompletedProcess`.

Both daemons can be stopped and started again on the same ports and data (key URLs embed
the key service's address, so it keeps its port across restarts).

Also here: waiting for a disk's I/O to fail or to serve again (conditions with a deadline),
and `revocation_latency`, a measurement (not an assertion) of how long a busy client
keeps succeeding after the key service acknowledged a revocation.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.servers import ROOT, DaemonProcess, wait_until

READY_TIMEOUT = 30.0
CLI_TIMEOUT = 120.0
KS_DEFAULT_ARGS = ("--heartbeat", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CliFailed(AssertionError):
    def __init__(self, argv, result: subprocess.CompletedProcess):
        super().__init__(f"{' '.join(argv)} exited {result.returncode}\nstdout: {result.stdout}\n"
                         f"stderr: {result.stderr}")
        self.result = result
        self.returncode = result.returncode
        self.stderr = result.stderr


class KeyServiceProcess(DaemonProcess):
    """`keyservice serve`, ready once it sent READY=1 to the NOTIFY_SOCKET we hand it."""

    def __init__(self, workdir: Path, data_dir: Path, port: int, extra_args=()):
        self.data_dir = Path(data_dir)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "keyservice", "serve", "--data-dir", str(data_dir),
                "--listen", f"127.0.0.1:{port}", *KS_DEFAULT_ARGS, *extra_args]
        super().__init__(argv, workdir, name="keyservice")

    def start(self) -> KeyServiceProcess:
        self.notify_path = str(self.workdir / f"ks-{self.port}-{time.monotonic_ns()}.notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self.notify_path)
        self.env = {"NOTIFY_SOCKET": self.notify_path}
        # The socket stays bound while the process runs: it also sends STOPPING=1 on SIGTERM.
        super().start()
        return self

    def _close_files(self) -> None:
        super()._close_files()
        if self.proc is not None and self.proc.poll() is not None and self._notify.fileno() >= 0:
            self._notify.close()
            os.unlink(self.notify_path)

    def _read_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                self.kill()
                raise RuntimeError(f"keyservice not ready (rc={self.process.returncode}); stderr:\n"
                                   f"{self.stderr_text()[-4000:]}")
            self._notify.settimeout(min(left, 0.5))
            try:
                msg = self._notify.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in msg:
                return msg

    @property
    def admin_credential(self) -> Path:
        return self.data_dir / "admin.credential"


class NbdServerProcess(DaemonProcess):
    """`nbdserver serve`, ready on `READY nbd=HOST:PORT api=HOST:PORT`."""

    def __init__(self, workdir: Path, data_dir: Path, ks: KeyServiceProcess, *, lease: float,
                 grace: float, nbd_port: int = 0, api_port: int = 0, extra_args=()):
        self.data_dir = Path(data_dir)
        argv = [sys.executable, "-m", "nbdserver.cli", "serve", "--data-dir", str(data_dir),
                "--nbd-listen", f"127.0.0.1:{nbd_port}", "--api-listen", f"127.0.0.1:{api_port}",
                "--keyservice-url", ks.url, "--keyservice-credential", str(ks.admin_credential),
                "--lease-seconds", str(lease), "--grace-seconds", str(grace), *extra_args]
        super().__init__(argv, workdir, ready_prefix="READY", name="nbdserver")

    def start(self) -> NbdServerProcess:
        super().start()
        fields = dict(part.split("=", 1) for part in self.ready_line.split()[1:])
        self.nbd_address, self.api_address = fields["nbd"], fields["api"]
        self.api_url = f"http://{self.api_address}"
        return self

    @property
    def token_file(self) -> Path:
        return self.data_dir / "api.token"


def stop_daemons(*daemons) -> None:
    """Stop each daemon that was started: politely, then kill -9 after 15 s (a dead one
    is reaped all the same)."""
    for d in daemons:
        if d is not None and d.proc is not None:
            if d.alive():
                try:
                    d.terminate(timeout=15)
                except subprocess.TimeoutExpired:
                    d.kill()
            else:
                d.kill()


class Stack:
    """Both daemons of the platform, with CLI and API helpers. See the module docstring."""

    def __init__(self, workdir: Path, *, lease: float = 60.0, grace: float = 3600.0,
                 nbd_args=(), ks_args=()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ks_dir = self.workdir / "ks"
        self.nb_dir = self.workdir / "nb"
        self.lease, self.grace = lease, grace
        self.nbd_args, self.ks_args = list(nbd_args), list(ks_args)
        self.ks = KeyServiceProcess(self.workdir, self.ks_dir, free_port(), self.ks_args)
        self.nb: NbdServerProcess | None = None
        self._admin_token: str | None = None
        self._logs: list[str] = []  # stderr of stopped processes, for leak scans and reports

    # -- lifecycle
    def start(self) -> Stack:
        self.start_keyservice()
        self.start_nbdserver()
        return self

    def start_keyservice(self) -> KeyServiceProcess:
        if self.ks.proc is not None:  # a restart: same port, same data
            self.ks = KeyServiceProcess(self.workdir, self.ks_dir, self.ks.port, self.ks_args)
        return self.ks.start()

    def stop_keyservice(self, *, kill: bool = False) -> None:
        self._stop(self.ks, kill)

    def restart_keyservice(self) -> None:
        self.stop_keyservice()
        self.start_keyservice()

    def start_nbdserver(self, *, same_ports: bool = False) -> NbdServerProcess:
        ports = {}
        if same_ports and self.nb is not None:
            ports = dict(nbd_port=int(self.nb.nbd_address.rsplit(":", 1)[1]),
                         api_port=int(self.nb.api_address.rsplit(":", 1)[1]))
        self.nb = NbdServerProcess(self.workdir, self.nb_dir, self.ks, lease=self.lease,
                                   grace=self.grace, extra_args=self.nbd_args, **ports).start()
        return self.nb

    def stop_nbdserver(self, *, kill: bool = False) -> int | None:
        return self._stop(self.nb, kill)

    def restart_nbdserver(self, **kw) -> NbdServerProcess:
        self.stop_nbdserver()
        return self.start_nbdserver(**kw)

    def _stop(self, d: DaemonProcess | None, kill: bool) -> int | None:
        if d is None or d.proc is None:
            return None
        if kill:
            d.kill()
        elif d.alive():
            rc = d.terminate()
            assert rc == 0, f"{d.name} exited {rc} on SIGTERM:\n{d.stderr_text()[-3000:]}"
        self._logs.append(d.stderr_text())
        return d.proc.returncode

    def close(self) -> None:
        stop_daemons(self.nb, self.ks)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def assert_healthy(self) -> None:
        """Both daemons run and neither logged a traceback."""
        for d in (self.ks, self.nb):
            if d is not None:
                d.assert_healthy()

    def logs(self) -> str:
        """Everything both daemons wrote on stderr, this run and the stopped ones."""
        return "\n".join(self._logs + [self.ks.stderr_text(), self.nb.stderr_text() if self.nb else ""])

    # -- addresses
    @property
    def ks_url(self) -> str:
        return self.ks.url

    @property
    def api_url(self) -> str:
        return self._running_nb().api_url

    def nbd_uri(self, disk: str) -> str:
        return f"nbd://{self._running_nb().nbd_address}/{disk}"

    def _running_nb(self) -> NbdServerProcess:
        if self.nb is None:
            raise RuntimeError("nbdserver is not running: start() or start_nbdserver() first")
        return self.nb

    def key_url(self, vault: str, key: str, version: str | None = None) -> str:
        return f"{self.ks_url}/vaults/{vault}/keys/{key}" + (f"/{version}" if version else "")

    @property
    def env(self) -> dict:
        """Environment for the CLIs: both services, as the platform admin."""
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(KEYSERVICE_URL=self.ks_url, KEYSERVICE_CREDENTIAL=str(self.ks.admin_credential))
        if self.nb is not None:
            env.update(NBDSERVER_API=self.api_url, NBDSERVER_TOKEN_FILE=str(self.nb.token_file))
        return env

    # -- the CLIs
    def keyservice(self, *args, check: bool = True, credential: Path | None = None):
        env = self.env
        if credential is not None:
            env["KEYSERVICE_CREDENTIAL"] = str(credential)
        return self._cli([sys.executable, "-m", "keyservice", *map(str, args)], env, check)

    def nbdserver(self, *args, check: bool = True):
        return self._cli([sys.executable, "-m", "nbdserver.cli", *map(str, args)], self.env, check)

    @staticmethod
    def _cli(argv, env, check):
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
        if not check:
            return r
        if r.returncode != 0:
            raise CliFailed(argv[2:], r)
        return json.loads(r.stdout) if r.stdout.strip() else None

    # -- raw HTTP, for what the CLIs do not offer (bad input, key attributes)
    def api(self, method: str, path: str, body=None, *, raw: bytes | None = None,
            token: str | None | bool = True, headers=None) -> tuple[int, Any]:
        """One request to the nbdserver API -> (status, decoded JSON or text)."""
        if token is True:
            token = self._running_nb().token_file.read_text().strip()
        return _http(self.api_url, method, path, body, raw=raw, token=token, headers=headers)

    def ks_api(self, method: str, path: str, body=None, *, _retry: bool = True) -> tuple[int, object]:
        """One request to the key service as its admin."""
        if self._admin_token is None:
            cred = json.loads(self.ks.admin_credential.read_text())
            status, tok = _http(self.ks_url, "POST", "/oauth2/token", {
                "grant_type": "client_credentials", "client_id": cred["client_id"],
                "client_secret": cred["client_secret"]}, token=None)
            assert status == 200, tok
            self._admin_token = tok["access_token"]
        status, out = _http(self.ks_url, method, path, body, token=self._admin_token)
        if status == 401 and _retry:  # e.g. a new signing key after a restart: log in again, once
            self._admin_token = None
            return self.ks_api(method, path, body, _retry=False)
        return status, out

    # -- the reference workflow's building blocks
    def customer_key(self, vault: str, key: str, des: str | None = None, *,
                     location: str = "local", subscription: str = "sub1",
                     grant: bool = True) -> dict:
        """A vault with soft delete and purge protection, an RSA key in it, and (with `des`)
        an encryption set on that key whose identity is granted get/wrapKey/unwrapKey."""
        self.keyservice("vault", "create", vault, "--location", location, "--subscription",
                        subscription, "--enable-purge-protection")
        bundle = self.keyservice("key", "create", vault, key, "--size", "2048")
        out = {"vault": vault, "key": key, "kid": bundle["key"]["kid"],
               "version": bundle["key"]["kid"].rsplit("/", 1)[1]}
        if des:
            shown = self.nbdserver("des", "create", des, "--key-url", self.key_url(vault, key))
            out["des"] = des
            out["object_id"] = shown["identity"]["objectId"]
            if grant:
                self.grant(vault, out["object_id"])
        return out

    def grant(self, vault: str, object_id: str, perms: str = "get,wrapKey,unwrapKey"):
        return self.keyservice("policy", "set", vault, "--object-id", object_id,
                               "--key-permissions", perms)

    def create_disk(self, name: str, *args) -> dict:
        return self.nbdserver("disk", "create", name, "--quiet", *args)

    def disk(self, name: str) -> dict:
        return self.nbdserver("disk", "show", name)

    def serving_state(self, name: str) -> str:
        status, body = self.api("GET", f"/disks/{name}")
        assert status == 200, body
        return body["serving"]["state"]

    def wait_serving(self, name: str, state: str = "available", timeout: float = 10.0) -> None:
        wait_until(lambda: self.serving_state(name) == state, timeout,
                   interval=0.02, what=f"disk {name} {state}")

    def dek(self, disk: str) -> bytes:
        """The disk's DEK, unwrapped in-test by the vault's admin (who created the vault and
        so holds every key permission): only to prove it never reaches storage or logs."""
        env = self.nbdserver("disk", "key-envelope", disk)
        vault, key, version = env["kid"].split("/vaults/", 1)[1].replace("/keys/", "/").split("/")
        out = self.keyservice("key", "unwrap", vault, key, "--version", version,
                              "--value", env["value"], "--alg", env["alg"])
        return base64.urlsafe_b64decode(out["value"] + "=" * (-len(out["value"]) % 4))

    def connect(self, disk: str):
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.nbd_uri(disk))
        return h


def _http(base, method, path, body=None, *, raw=None, token=None, headers=None):
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(base + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, (json.loads(payload) if payload else None)
    except ValueError:
        return status, payload.decode(errors="replace")


# --------------------------------------------------------------------------- I/O conditions
def is_eio(e: Exception) -> bool:
    return getattr(e, "errnum", None) == errno.EIO  # nbd.Error: .errno is the symbolic name


def io_fails(h, offset: int = 0) -> bool:
    """One read on an attached handle: True once it fails with EIO."""
    import nbd
    try:
        h.pread(4096, offset)
        return False
    except nbd.Error as e:
        if is_eio(e):
            return True
        raise


def wait_for_eio(h, timeout: float = 5.0, offset: int = 0) -> None:
    """The revocation took effect: a read on the attached handle fails with EIO."""
    wait_until(lambda: io_fails(h, offset), timeout, interval=0.01, what="EIO on the disk")


def wait_for_io(h, timeout: float = 10.0, offset: int = 0) -> None:
    """Access restored: a read on the same handle succeeds again (no reconnect)."""
    wait_until(lambda: not io_fails(h, offset), timeout, interval=0.02, what="I/O to succeed")


def connect_refused(stack: Stack, disk: str) -> str | None:
    """The error message of a new connection to `disk`, or None if it connected."""
    import nbd
    try:
        h = stack.connect(disk)
    except nbd.Error as e:
        return e.string
    h.shutdown()
    return None


def refusal_message(stack: Stack, disk: str) -> str:
    """The server's own words when it refuses a new connection to `disk` (libnbd keeps them
    in its debug log only; nbdinfo with LIBNBD_DEBUG=1 shows them)."""
    r = subprocess.run(["nbdinfo", stack.nbd_uri(disk)], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, LIBNBD_DEBUG="1"))
    if r.returncode == 0:
        return ""
    marker = "server error message: "
    lines = [ln.split(marker, 1)[1] for ln in r.stderr.splitlines() if marker in ln]
    return lines[-1] if lines else r.stderr


def pattern(tag: int, length: int) -> bytes:
    """A recognisable, non-repeating-per-tag block of data."""
    unit = (tag.to_bytes(4, "little") + b"PLATFORM-TEST-BLK")[:16]
    return (unit * (length // 16 + 1))[:length]


class Writer(threading.Thread):
    """A client writing in a loop on its own connection (FUA), until stopped or an error.

    `acked` holds (offset, tag) of every write the server acknowledged; `error` the first
    failure (an nbd.Error), `first_error_at` its time.monotonic()."""

    def __init__(self, stack: Stack, disk: str, *, base: int = 0, span: int = 4 << 20,
                 block: int = 64 << 10, reads: bool = True):
        super().__init__(daemon=True, name=f"writer-{disk}")
        self.h = stack.connect(disk)
        self.base, self.span, self.block, self.reads = base, span, block, reads
        self.acked: dict[int, int] = {}
        self.count = 0
        self.error: Exception | None = None
        self.first_error_at: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        import nbd
        slots = self.span // self.block
        i = 0
        while not self._halt.is_set():
            off = self.base + (i % slots) * self.block
            try:
                self.h.pwrite(pattern(i, self.block), off, nbd.CMD_FLAG_FUA)
                self.acked[off] = i
                if self.reads:
                    self.h.pread(4096, off)
            except nbd.Error as e:
                self.first_error_at = time.monotonic()
                self.error = e
                return
            self.count += 1
            i += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def close(self) -> None:
        self.stop()
        try:
            self.h.shutdown()
        except Exception:
            pass

    def verify(self, h=None) -> None:
        """Every acknowledged write reads back (on `h`, default its own handle)."""
        h = h or self.h
        for off, tag in sorted(self.acked.items()):
            got = h.pread(self.block, off)
            assert got == pattern(tag, self.block), f"block at {off} lost its acknowledged write {tag}"


# --------------------------------------------------------------------------- measurement
def revocation_latency(stack: Stack, disk: str, vault: str, key: str, trials: int = 20,
                       *, timeout: float = 10.0) -> dict:
    """Seconds from the key service's answer to `key disable` to the first failed I/O of a
    client writing in a loop, over `trials` disable/enable cycles. A measurement for reports
    and benchmarks, never an assertion: returns {"samples", "p50", "p99", "max"}."""
    samples = []
    for _ in range(trials):
        stack.wait_serving(disk)
        w = Writer(stack, disk, span=1 << 20, block=4096, reads=False)
        w.start()
        wait_until(lambda: w.count > 10 or w.error, 10, what="the writer to run")
        status, body = stack.ks_api("PATCH", f"/vaults/{vault}/keys/{key}",
                                    {"attributes": {"enabled": False}})
        answered = time.monotonic()
        assert status == 200, body
        wait_until(lambda: w.error is not None, timeout, what="the writer's first failed I/O")
        # Negative: the disk locked before the owner's own client had read the answer.
        assert w.first_error_at is not None  # set with w.error
        samples.append(w.first_error_at - answered)
        w.close()
        status, body = stack.ks_api("PATCH", f"/vaults/{vault}/keys/{key}",
                                    {"attributes": {"enabled": True}})
        assert status == 200, body
    ordered = sorted(samples)
    return {"samples": samples, "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))],
            "max": ordered[-1]}


def scan_for(needles: dict[str, bytes], roots: list[Path], extra_texts=()) -> list[str]:
    """Where any needle occurs in the files under `roots` or in `extra_texts`."""
    hits = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                for name, needle in needles.items():
                    if needle in data:
                        hits.append(f"{name} in {p}")
    for i, text in enumerate(extra_texts):
        data = text.encode() if isinstance(text, str) else text
        for name, needle in needles.items():
            if needle in data:
                hits.append(f"{name} in text #{i}")
    return hits


__all__ = ["Stack", "CliFailed", "Writer", "wait_for_eio", "wait_for_io", "io_fails",
           "connect_refused", "refusal_message", "pattern", "revocation_latency", "scan_for", "wait_until"]
