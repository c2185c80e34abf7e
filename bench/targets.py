"""The servers under test. Each `Target` makes its own image in a work directory, starts its
server on a loopback TCP port, and hands back an NBD URI; `stop()` tears it all down.

New kinds register themselves with `@register`; the harness knows only the base class.
A target that cannot run here (a tool not installed, a layer not written yet) says why in
`unavailable()` and is skipped, not failed.

Secrets (the XTS key, the LUKS passphrase) live in 0600 files in the work directory and are
passed by file name, so they never show on a command line or in results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from .process import ServerProcess, ServerStartError, free_port
from .workloads import Workload

HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # LUKS open runs PBKDF2 before the server listens


class Target:
    """A server to benchmark. Subclasses set `name`, `description`, and implement `_serve`
    (and `_prepare` if the image needs making before the server starts)."""
    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, workdir: Path, size: int):
        self.workdir = workdir / self.name
        self.size = size
        self.command: list[str] = []  # the server's argv, for the record
        self.uri: str | None = None
        self._server: ServerProcess | None = None

    def unavailable(self) -> str | None:
        """None if this target can run on this machine, else the reason it cannot."""
        return None

    def supports(self, workload: Workload) -> str | None:
        """None if this target runs `workload`, else why not (reported as not applicable)."""
        return None

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self.uri = self._serve()
        return self.uri

    def restart(self) -> str:
        """The server process stopped and started again on the same image: what a cold
        run needs, since pages a process has mapped survive `drop_caches`. The URI may
        change (a new port)."""
        self._stop_server()
        self.uri = self._serve()
        return self.uri

    def stop(self) -> None:
        self._stop_server()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        """The server's process, whose CPU time is measured; None if there is none."""
        return self._server.pid if self._server is not None else None

    def export_size(self) -> int:
        return export_size(self.started_uri())

    def started_uri(self) -> str:
        if self.uri is None:
            raise ServerStartError(f"{self.name} is not started")
        return self.uri

    def fill(self, source: Path) -> float:
        """Copy `source` onto the export; returns the seconds it took (for the record only)."""
        started = time.monotonic()
        done = subprocess.run(["nbdcopy", str(source), self.started_uri()], capture_output=True, text=True,
                              timeout=1800)
        if done.returncode:
            raise ServerStartError(f"prefill with nbdcopy failed: {done.stderr.strip()}")
        return time.monotonic() - started

    def _prepare(self) -> None:
        """Make the image and the secrets, once, before the first start."""

    def _serve(self) -> str:
        """Start the server on the prepared image; return its NBD URI once it is ready."""
        raise NotImplementedError

    def _stop_server(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _spawn(self, argv: list[str], **kw) -> ServerProcess:
        self.command = argv
        self._server = ServerProcess(argv, self.workdir / "server.log")
        self._server.start(**kw)
        return self._server

    @property
    def image(self) -> Path:
        return self.workdir / "disk.img"

    def secret_file(self, name: str, data: bytes) -> Path:
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path


def export_size(uri: str) -> int:
    out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise ServerStartError(f"nbdinfo --size failed: {out.stderr.strip()}")
    return int(out.stdout.strip())


REGISTRY: dict[str, type[Target]] = {}


def register(cls: type[Target]) -> type[Target]:
    REGISTRY[cls.name] = cls
    return cls


def missing_tools(*tools: str) -> str | None:
    gone = [t for t in tools if shutil.which(t) is None]
    return f"not installed: {', '.join(gone)}" if gone else None


# -- this project's server

@register
class PlainTarget(Target):
    name = "plain"
    description = "nbdserver.baseline, plain file backend"

    def export_spec(self) -> str:
        return f"disk={self.image},size={self.size}"

    def _serve(self) -> str:
        argv = [sys.executable, "-m", "nbdserver.baseline", "--listen", f"{HOST}:0",
                "--log-level", "WARNING", self.export_spec()]
        server = self._spawn(argv, capture_stdout=True)
        _, host, port = server.wait_for_line("LISTENING ", START_TIMEOUT).split()
        return f"nbd://{host}:{port}/disk"


@register
class XtsTarget(PlainTarget):
    name = "xts"
    description = "nbdserver.baseline, AES-256-XTS layer over the file backend"

    def unavailable(self) -> str | None:
        # The layer is a separate module that may not exist (or import) yet; ask a fresh
        # interpreter so a half-written module cannot break the harness itself.
        probe = subprocess.run([sys.executable, "-c", "from nbdserver.crypto import XtsLayer"],
                               capture_output=True, text=True)
        if probe.returncode:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return f"nbdserver.crypto does not import: {last}"
        return None

    def _prepare(self) -> None:
        # XTS takes two AES-256 keys; halves that are equal would be refused (IEEE 1619 / FIPS).
        # Made once: a restarted server must read the same ciphertext with the same key.
        key = os.urandom(64)
        while key[:32] == key[32:]:
            key = os.urandom(64)
        self._keyfile = self.secret_file("dek.key", key)

    def export_spec(self) -> str:
        return f"{super().export_spec()},key={self._keyfile}"


@register
class PlainDirectTarget(PlainTarget):
    name = "plain-direct"
    description = "nbdserver.baseline, plain file backend, cache=none (O_DIRECT)"

    def export_spec(self) -> str:
        return f"{super().export_spec()},cache=none"


@register
class XtsDirectTarget(XtsTarget):
    name = "xts-direct"
    description = "nbdserver.baseline, AES-256-XTS layer, cache=none (O_DIRECT)"

    def export_spec(self) -> str:
        return f"{super().export_spec()},cache=none"


class _ReadQueueChoice(PlainTarget):
    """The baseline with its cold-read queue forced (NBDSERVER_READQ, nbdserver/readqueue.py):
    the io_uring ring against the native threads, side by side in one run."""
    read_queue: ClassVar[str]

    def _spawn(self, argv: list[str], **kw) -> ServerProcess:
        self.command = [f"NBDSERVER_READQ={self.read_queue}", *argv]
        self._server = ServerProcess(argv, self.workdir / "server.log",
                                     env=dict(os.environ, NBDSERVER_READQ=self.read_queue))
        self._server.start(**kw)
        return self._server


def _read_queue_targets() -> None:
    """plain-uring, plain-threads, xts-uring, xts-threads and their -direct (cache=none)."""
    for base in (PlainTarget, XtsTarget, PlainDirectTarget, XtsDirectTarget):
        for kind in ("uring", "threads"):
            register(type(f"{base.__name__}_{kind}", (_ReadQueueChoice, base), {
                "name": f"{base.name}-{kind}", "read_queue": kind,
                "description": f"{base.description}, cold reads on "
                               + ("io_uring" if kind == "uring" else "the thread read queue"),
            }))


_read_queue_targets()


@register
class XtsUringDeferTarget(XtsTarget):
    """The xts baseline on io_uring with DEFER_TASKRUN (NBDSERVER_URING_TASKRUN=defer),
    against `xts-uring` (the kernel's default task work) side by side: a shared host
    could not tell them apart (docs/operations.md, "Cache modes"), a quiet one may."""
    name = "xts-uring-defer"
    description = "nbdserver.baseline, AES-256-XTS layer, io_uring with deferred task work"
    ENV: ClassVar[dict[str, str]] = {"NBDSERVER_READQ": "uring", "NBDSERVER_URING_TASKRUN": "defer"}

    def _spawn(self, argv: list[str], **kw) -> ServerProcess:
        self.command = [*(f"{k}={v}" for k, v in self.ENV.items()), *argv]
        self._server = ServerProcess(argv, self.workdir / "server.log", env=dict(os.environ, **self.ENV))
        self._server.start(**kw)
        return self._server


class _NbdOverTls(PlainTarget):
    """Mixin: the same server with NBD TLS required (STARTTLS, TLS 1.3, a fresh test CA from
    `daemonkit.tlsca`, as `nbdserver tls init` makes). The URI says tls-verify-peer=false:
    fio's nbd engine cannot be handed a CA (libnbd refuses `tls-certificates=` in URIs from
    programs that do not allow local files), and verification is a once-per-connection
    cost; what is measured, the encryption of every byte, is the same."""

    def _prepare(self) -> None:
        from daemonkit.tlsca import init_ca
        super()._prepare()
        init_ca(self.workdir / "tls")

    def _serve(self) -> str:
        certs = self.workdir / "tls"
        argv = [sys.executable, "-m", "nbdserver.baseline", "--listen", f"{HOST}:0",
                "--log-level", "WARNING", "--tls-mode", "required", "--tls-dir", str(certs),
                self.export_spec()]
        server = self._spawn(argv, capture_stdout=True)
        _, host, port = server.wait_for_line("LISTENING ", START_TIMEOUT).split()
        return f"nbds://{host}:{port}/disk?tls-verify-peer=false"


@register
class PlainTlsTarget(_NbdOverTls, PlainTarget):
    name = "plain-tls"
    description = "nbdserver.baseline, plain file backend, NBD over TLS (X.509)"


@register
class XtsTlsTarget(_NbdOverTls, XtsTarget):
    name = "xts-tls"
    description = "nbdserver.baseline, AES-256-XTS layer, NBD over TLS (X.509)"


# -- the product path: the platform's own daemons and a disk made through its CLI

ROOT = Path(__file__).resolve().parent.parent


class ProductTarget(Target):
    """`nbdserver serve` with a platform disk: a key service, the NBD server and its API,
    a disk created with `nbdserver disk create` (so a DEK wrapped by the key service,
    unwrapped again on every server start). Restarts restart `nbdserver serve` only, on
    the same ports, and wait until the disk serves again."""

    DISK = "bench"
    key_args: ClassVar[tuple[str, ...]] = ()
    # `nbdserver serve`'s own default unless a target says otherwise: one I/O worker
    # process per core (docs/operations.md, "I/O processes").
    serve_args: ClassVar[tuple[str, ...]] = ()
    serve_env: ClassVar[dict[str, str]] = {}  # added to `nbdserver serve`'s environment

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ks_port, self._nbd_port, self._api_port = free_port(), free_port(), free_port()
        self._ks_url = f"http://{HOST}:{ks_port}"
        self._credential = self.workdir / "ks" / "admin.credential"
        ks = ServerProcess(
            [sys.executable, "-m", "keyservice", "serve", "--data-dir", str(self.workdir / "ks"),
             "--listen", f"{HOST}:{ks_port}"],
            self.workdir / "keyservice.log", env=_child_env())
        self._ks: ServerProcess | None = ks
        ks.start()
        ks.wait_for_port(HOST, ks_port, START_TIMEOUT)
        _wait(lambda: self._credential.exists() and self._credential.stat().st_size > 0,
              START_TIMEOUT, "the key service's admin credential")
        self.uri = self._serve()
        self._make_disk()
        found = sorted((self.workdir / "nb" / "disks").glob("*.img"))
        if len(found) != 1:
            raise ServerStartError(f"expected one disk file under nb/disks, found {len(found)}")
        self._image = found[0]
        return self.uri

    def _make_disk(self) -> None:
        self._cli("nbdserver.cli", "disk", "create", self.DISK, "--size", str(self.size), "--quiet")

    def _serve(self) -> str:
        argv = [sys.executable, "-m", "nbdserver.cli", "serve",
                "--data-dir", str(self.workdir / "nb"),
                "--nbd-listen", f"{HOST}:{self._nbd_port}", "--api-listen", f"{HOST}:{self._api_port}",
                "--keyservice-url", self._ks_url, "--keyservice-credential", str(self._credential),
                "--log-level", "WARNING", *self.serve_args]
        self.command = argv
        self._server = ServerProcess(argv, self.workdir / "server.log",
                                     env=dict(_child_env(), **self.serve_env))
        self._server.start(capture_stdout=True)
        self._server.wait_for_line("READY ", START_TIMEOUT)
        if getattr(self, "_image", None) is not None:  # a restart: the disk must serve again
            _wait(self._disk_available, START_TIMEOUT, f"disk {self.DISK} to serve again")
        return f"nbd://{HOST}:{self._nbd_port}/{self.DISK}"

    def _disk_available(self) -> bool:
        token = (self.workdir / "nb" / "api.token").read_text().strip()
        req = urllib.request.Request(f"http://{HOST}:{self._api_port}/disks/{self.DISK}",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.load(resp).get("serving", {}).get("state") == "available"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _cli(self, module: str, *args: str) -> Any:  # the command's JSON output, if any
        env = _child_env()
        env.update(KEYSERVICE_URL=self._ks_url, KEYSERVICE_CREDENTIAL=str(self._credential),
                   NBDSERVER_API=f"http://{HOST}:{self._api_port}",
                   NBDSERVER_TOKEN_FILE=str(self.workdir / "nb" / "api.token"))
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
        if done.returncode:
            raise ServerStartError(f"{module} {' '.join(args[:2])} failed: {done.stderr.strip()[-300:]}")
        return json.loads(done.stdout) if done.stdout.strip() else None

    @property
    def image(self) -> Path:
        return self._image

    def stop(self) -> None:
        self._stop_server()
        ks: ServerProcess | None = getattr(self, "_ks", None)
        self._ks = None
        if ks is not None:
            ks.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@register
class ProductPlatformKeyTarget(ProductTarget):
    name = "product"
    description = "nbdserver serve, platform disk, platform-managed key (AES-256-XTS)"


@register
class ProductOneProcessTarget(ProductTarget):
    name = "product-1proc"
    description = "as product, every connection served by the main process (--io-processes 1)"
    serve_args = ("--io-processes", "1")


@register
class ProductPythonPathTarget(ProductTarget):
    name = "product-python"
    description = ("as product, the page-cache fast path off (NBDSERVER_CACHED_IO=0): every "
                   "request on the Python path, to measure that path side by side")
    serve_env = {"NBDSERVER_CACHED_IO": "0"}


@register
class ProductLoopTarget(ProductTarget):
    name = "product-loop"
    description = ("as product, no native sessions (NBDSERVER_NATIVE_SESSIONS=0): every request "
                   "answered on the event loop, the fast path per received chunk")
    serve_env = {"NBDSERVER_NATIVE_SESSIONS": "0"}


@register
class ProductOneLoopTarget(ProductTarget):
    name = "product-1loop"
    description = ("as product, one event loop does all the request work: every connection "
                   "in the main process (--io-processes 1), no native sessions")
    serve_args = ("--io-processes", "1")
    serve_env = {"NBDSERVER_NATIVE_SESSIONS": "0"}


@register
class ProductCustomerKeyTarget(ProductTarget):
    name = "product-cmk"
    description = "nbdserver serve, platform disk under a customer-managed key (vault, key, set)"
    des_args: ClassVar[tuple[str, ...]] = ()  # `nbdserver des create`'s options

    def _make_disk(self) -> None:
        vault, key, des = "bench-vault", "bench-key", "bench-des"
        self._cli("keyservice", "vault", "create", vault, "--location", "local",
                  "--subscription", "bench", "--enable-purge-protection")
        self._cli("keyservice", "key", "create", vault, key, "--size", "2048")
        shown = self._cli("nbdserver.cli", "des", "create", des,
                          "--key-url", f"{self._ks_url}/vaults/{vault}/keys/{key}", *self.des_args)
        self._cli("keyservice", "policy", "set", vault, "--object-id", shown["identity"]["objectId"],
                  "--key-permissions", "get,wrapKey,unwrapKey")
        self._cli("nbdserver.cli", "disk", "create", self.DISK, "--size", str(self.size),
                  "--des", des, "--quiet")


@register
class ProductDoubleTarget(ProductCustomerKeyTarget):
    name = "product-double"
    description = ("as product-cmk, the set EncryptionAtRestWithPlatformAndCustomerKeys: every "
                   "sector encrypted twice, platform DEK inside, customer DEK outside")
    des_args = ("--double-encryption",)


@register
class ProductFipsTarget(ProductTarget):
    name = "product-fips"
    description = ("as product, `nbdserver serve --fips`: AES-256-XTS and the DEK in OpenSSL's "
                   "FIPS provider (docs/operations.md, \"FIPS mode\")")
    serve_args = ("--fips",)


@register
class ProductDirectTarget(ProductTarget):
    name = "product-direct"
    description = "nbdserver serve, platform disk made with --cache none (O_DIRECT), platform-managed key"

    def _make_disk(self) -> None:
        self._cli("nbdserver.cli", "disk", "create", self.DISK, "--size", str(self.size),
                  "--cache", "none", "--quiet")


def _child_env() -> dict:
    env = dict(os.environ)
    # Readiness is watched here, not through systemd: a daemon must not notify the
    # service manager that runs the bench.
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait(predicate, timeout: float, what: str) -> None:
    """Poll a condition until it holds, or fail when the deadline passes."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not predicate():
        if time.monotonic() >= deadline:
            raise ServerStartError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@register
class PythonFloorTarget(Target):
    name = "python-floor"
    description = ("bench/floor.py: a minimal NBD server in Python on uvloop (pread/pwrite, "
                   "no checks, no encryption): the floor of any Python event-loop server here")

    def _prepare(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(self.size)

    def _serve(self) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "bench.floor", str(self.image), str(port)]
        self._server = ServerProcess(argv, self.workdir / "server.log", env=_child_env())
        self.command = argv
        self._server.start(capture_stdout=True)
        self._server.wait_for_line("LISTENING ", START_TIMEOUT)
        return f"nbd://{HOST}:{port}/disk"


# -- reference servers

@register
class NbdkitTarget(Target):
    name = "nbdkit"
    description = "nbdkit file plugin (C, plain)"

    def unavailable(self) -> str | None:
        return missing_tools("nbdkit")

    def _nbdkit(self, port: int, *extra: str) -> list[str]:
        return ["nbdkit", "--exit-with-parent", "-f", "-i", HOST, "-p", str(port), *extra]

    def _prepare(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(self.size)

    def _serve(self) -> str:
        port = free_port()
        self._spawn(self._nbdkit(port, "file", str(self.image))).wait_for_port(HOST, port, START_TIMEOUT)
        return f"nbd://{HOST}:{port}/"  # nbdkit's default export name is ""


PASSPHRASE_ID = "sec0"


class LuksImage:
    """A LUKS1 image as qemu-img makes it: aes-256-xts-plain64, sha256, 512-byte sectors.
    A short PBKDF2 time, since only the data path is measured, not the unlock."""

    ITER_TIME_MS = 100
    ATTEMPTS = 6

    @staticmethod
    def create(target: Target) -> Path:
        passfile = target.secret_file("passphrase", os.urandom(24).hex().encode())
        argv = ["qemu-img", "create", "-q", "-f", "luks",
                "--object", f"secret,id={PASSPHRASE_ID},file={passfile}",
                "-o", f"key-secret={PASSPHRASE_ID},cipher-alg=aes-256,cipher-mode=xts,"
                      f"ivgen-alg=plain64,hash-alg=sha256,iter-time={LuksImage.ITER_TIME_MS}",
                str(target.image), str(target.size)]
        # qemu-img times PBKDF2 with the thread's CPU clock to pick the iteration count; where
        # that clock is coarse the first probe can read 0 ms and qemu gives up ("Unable to get
        # accurate CPU usage", about 1 in 4 here). Each attempt is independent, so a few retries
        # make it rare, while a real error still surfaces.
        for _ in range(LuksImage.ATTEMPTS):
            done = subprocess.run(argv, capture_output=True, text=True)
            if not done.returncode:
                return passfile
            target.image.unlink(missing_ok=True)
        raise ServerStartError(f"qemu-img create failed {LuksImage.ATTEMPTS} times: {done.stderr.strip()}")


@register
class NbdkitLuksTarget(NbdkitTarget):
    name = "nbdkit-luks"
    description = "nbdkit file plugin + luks filter (LUKS1 aes-xts-plain64)"

    def unavailable(self) -> str | None:
        return missing_tools("nbdkit", "qemu-img")

    def _prepare(self) -> None:
        self._passfile = LuksImage.create(self)

    def _serve(self) -> str:
        passfile = self._passfile
        port = free_port()
        # passphrase=+FILE: nbdkit reads the secret from the file (nbdkit(1), "SECRETS").
        argv = self._nbdkit(port, "--filter=luks", "file", str(self.image), f"passphrase=+{passfile}")
        self._spawn(argv).wait_for_port(HOST, port, START_TIMEOUT)
        return f"nbd://{HOST}:{port}/"


@register
class QemuNbdLuksTarget(Target):
    name = "qemu-nbd-luks"
    description = "qemu-nbd, LUKS1 aes-xts-plain64 image"

    def unavailable(self) -> str | None:
        return missing_tools("qemu-nbd", "qemu-img")

    def _prepare(self) -> None:
        self._passfile = LuksImage.create(self)

    def _serve(self) -> str:
        passfile = self._passfile
        port = free_port()
        # --persistent and --shared: fio, nbdcopy (up to 4 connections) and nbdinfo each
        # connect in turn, and qemu-nbd would otherwise exit after the first client.
        argv = ["qemu-nbd", "--object", f"secret,id={PASSPHRASE_ID},file={passfile}",
                "--image-opts", f"driver=luks,key-secret={PASSPHRASE_ID},file.filename={self.image}",
                "-b", HOST, "-p", str(port), "-x", "disk", "--persistent", "--shared=8",
                "--cache=writeback"]
        self._spawn(argv).wait_for_port(HOST, port, START_TIMEOUT)
        return f"nbd://{HOST}:{port}/disk"


# -- the storage itself

@register
class DeviceTarget(Target):
    """Not a server: fio on a file of the image's file system, O_DIRECT, 16 threads of
    synchronous requests. The device's own rate for cold random reads, which a server
    should approach when it keeps the client's queue depth in flight."""

    name = "device"
    description = "fio psync O_DIRECT x 16 threads on a file in the same file system (cold reads)"

    def supports(self, workload: Workload) -> str | None:
        if workload.state != "cold" or workload.rw != "randread":
            return "the device baseline is for cold random reads only"
        return None

    def _prepare(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(self.size)

    def _serve(self) -> str:
        self.command = ["fio", "--ioengine=psync", "--direct=1", "--numjobs=16", f"--filename={self.image}"]
        return ""

    def export_size(self) -> int:
        return self.size

    def fill(self, source: Path) -> float:
        started = time.monotonic()
        shutil.copyfile(source, self.image)
        return time.monotonic() - started


# -- disks on Ceph RBD: ours and qemu's librbd clients, on one throwaway cluster

class _SharedCeph:
    """The single-node cluster of tests/helpers/ceph.py (one monitor, one memstore OSD),
    started by the first RBD target and stopped with the last, so every RBD target
    reads and writes the same cluster. memstore keeps the data in the OSD's memory: what
    these targets compare is the client side (librbd, the server, its encryption), not
    a device."""

    cluster: ClassVar[Any] = None
    users: ClassVar[int] = 0

    @classmethod
    def acquire(cls, workdir: Path) -> Any:
        if cls.cluster is None:
            from tests.helpers.ceph import CephCluster
            try:
                cls.cluster = CephCluster(workdir / "ceph").start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                raise ServerStartError(f"the Ceph cluster did not start: {e}") from None
        cls.users += 1
        return cls.cluster

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0 and cls.cluster is not None:
            cls.cluster.stop()
            cls.cluster = None


class RbdTarget(Target):
    """A target whose disk is an RBD image of the shared cluster; `_prepare` makes it."""

    tools: ClassVar[tuple[str, ...]] = ()
    ceph: Any
    rbd_image: str

    def unavailable(self) -> str | None:
        from tests.helpers.ceph import missing
        return missing() or missing_tools(*self.tools)

    def start(self) -> str:
        self.ceph = _SharedCeph.acquire(self.workdir.parent)
        self._holds_ceph = True
        self.rbd_image = f"bench-{self.name}"
        return super().start()

    def stop(self) -> None:
        super().stop()
        if getattr(self, "_holds_ceph", False):
            self._holds_ceph = False
            _SharedCeph.release()

    @property
    def image(self) -> Path:
        # The disk is in Ceph: no file, and nothing of it in this host's page cache to
        # warm (librbd's cache is off, memstore keeps the data in the OSD). The harness's
        # warm-up reads this empty file instead.
        path = self.workdir / "image-is-in-ceph"
        path.touch()
        return path

    def ceph_args(self) -> list[str]:
        return ["--ceph-conf", str(self.ceph.conf), "--ceph-id", self.ceph.client_id,
                "--ceph-keyring", str(self.ceph.keyring)]

    def qemu_rbd(self) -> str:
        """qemu's rbd driver options for the image (the keyring is the one ceph.conf names)."""
        return (f"pool={self.ceph.pool},image={self.rbd_image},conf={self.ceph.conf},"
                f"user={self.ceph.client_id}")


@register
class RbdXtsTarget(RbdTarget, XtsTarget):
    name = "rbd-xts"
    description = "nbdserver.baseline, AES-256-XTS layer over RbdBackend (librbd, cache off)"

    def export_spec(self) -> str:
        return f"disk=rbd:{self.ceph.pool}/{self.rbd_image},size={self.size},key={self._keyfile}"

    def _serve(self) -> str:
        argv = [sys.executable, "-m", "nbdserver.baseline", "--listen", f"{HOST}:0",
                "--log-level", "WARNING", *self.ceph_args(), self.export_spec()]
        server = self._spawn(argv, capture_stdout=True)
        _, host, port = server.wait_for_line("LISTENING ", START_TIMEOUT).split()
        return f"nbd://{host}:{port}/disk"


@register
class RbdXtsWorkersTarget(RbdXtsTarget):
    name = "rbd-xts-workers"
    description = "rbd-xts with librbd aio off (NBDSERVER_RBD_AIO=0): each request on a worker"

    def _spawn(self, argv: list[str], **kw) -> ServerProcess:
        self.command = ["NBDSERVER_RBD_AIO=0", *argv]
        self._server = ServerProcess(argv, self.workdir / "server.log",
                                     env=dict(os.environ, NBDSERVER_RBD_AIO="0"))
        self._server.start(**kw)
        return self._server


class _QemuNbdRbd(RbdTarget):
    """qemu-nbd over qemu's rbd driver (Debian's qemu-block-extra), with --cache=none,
    which turns librbd's cache off as ours is."""

    tools = ("qemu-nbd", "qemu-img", "rbd")
    _passfile: Path

    def _image_opts(self) -> str:
        raise NotImplementedError

    def _serve(self) -> str:
        port = free_port()
        argv = ["qemu-nbd", "--object", f"secret,id={PASSPHRASE_ID},file={self._passfile}",
                "--image-opts", self._image_opts(), "-b", HOST, "-p", str(port), "-x", "disk",
                "--persistent", "--shared=8", "--cache=none"]
        self._spawn(argv).wait_for_port(HOST, port, START_TIMEOUT)
        return f"nbd://{HOST}:{port}/disk"


@register
class QemuNbdRbdLuksTarget(_QemuNbdRbd):
    name = "qemu-nbd-rbd-luks"
    description = "qemu-nbd, qemu's LUKS1 aes-xts-plain64 driver over its rbd driver"

    def _prepare(self) -> None:
        self._passfile = self.secret_file("passphrase", os.urandom(24).hex().encode())
        dest = f"rbd:{self.ceph.pool}/{self.rbd_image}:conf={self.ceph.conf}:id={self.ceph.client_id}"
        argv = ["qemu-img", "create", "-q", "-f", "luks",
                "--object", f"secret,id={PASSPHRASE_ID},file={self._passfile}",
                "-o", f"key-secret={PASSPHRASE_ID},cipher-alg=aes-256,cipher-mode=xts,"
                      f"ivgen-alg=plain64,hash-alg=sha256,iter-time={LuksImage.ITER_TIME_MS}",
                dest, str(self.size)]
        for _ in range(LuksImage.ATTEMPTS):  # see LuksImage: qemu-img's coarse PBKDF2 timing
            done = subprocess.run(argv, capture_output=True, text=True)
            if not done.returncode:
                return
            self.ceph.rbd("rm", "--no-progress", f"{self.ceph.pool}/{self.rbd_image}")
        raise ServerStartError(f"qemu-img create on RBD failed: {done.stderr.strip()}")

    def _image_opts(self) -> str:
        return f"driver=luks,key-secret={PASSPHRASE_ID},file.driver=rbd," + \
            ",".join(f"file.{o}" for o in self.qemu_rbd().split(","))


@register
class QemuNbdRbdLuks2Target(_QemuNbdRbd):
    name = "qemu-nbd-rbd-luks2"
    description = "qemu-nbd, librbd's own LUKS2 encryption (rbd encryption format), qemu's rbd driver"

    # librbd's LUKS2 header (16 MiB) is taken from the image: made that much larger, the
    # export is the size asked for.
    HEADER = 16 << 20

    def _prepare(self) -> None:
        self._passfile = self.secret_file("passphrase", os.urandom(24).hex().encode())
        where = f"{self.ceph.pool}/{self.rbd_image}"
        self.ceph.rbd("create", "--size", f"{self.size + self.HEADER}B", where)
        self.ceph.rbd("encryption", "format", where, "luks2", str(self._passfile), timeout=300)

    def _image_opts(self) -> str:
        return f"driver=rbd,{self.qemu_rbd()},encrypt.format=luks2,encrypt.key-secret={PASSPHRASE_ID}"


def select(names: str | None) -> list[str]:
    """`"a,b"` -> those target names in the order given; None or "all" -> every registered one."""
    if not names or names == "all":
        return list(REGISTRY)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    return wanted
