"""The servers under test. Each `Target` makes its own image in a work directory, starts its
server on a loopback TCP port, and hands back an NBD URI; `stop()` tears it all down.

New kinds register themselves with `@register`; the harness knows only the base class.
A target that cannot run here (a tool not installed, a layer not written yet) says why in
`unavailable()` and is skipped, not failed.

Secrets (the XTS key, the LUKS passphrase) live in 0600 files in the work directory and are
passed by file name, so they never show on a command line or in results.json.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from .process import ServerProcess, ServerStartError, free_port

HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # LUKS open runs PBKDF2 before the server listens


class Target:
    """A server to benchmark. Subclasses set `name`, `description`, and implement `_launch`."""
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

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.uri = self._launch()
        return self.uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _launch(self) -> str:
        raise NotImplementedError

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

    def _launch(self) -> str:
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

    def export_spec(self) -> str:
        # XTS takes two AES-256 keys; halves that are equal would be refused (IEEE 1619 / FIPS).
        key = os.urandom(64)
        while key[:32] == key[32:]:
            key = os.urandom(64)
        keyfile = self.secret_file("dek.key", key)
        return f"{super().export_spec()},key={keyfile}"


class _NbdOverTls:
    """Mixin: the same server with NBD TLS required (STARTTLS, TLS 1.3, a fresh test CA from
    `keyservice.tlsca`, as `nbdserver tls init` makes). The URI says tls-verify-peer=false:
    fio's nbd engine cannot be handed a CA (libnbd refuses `tls-certificates=` in URIs from
    programs that do not allow local files), and verification is a once-per-connection
    cost; what is measured, the encryption of every byte, is the same."""

    def _launch(self) -> str:
        from keyservice.tlsca import init_ca
        certs = self.workdir / "tls"
        init_ca(certs)
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


# -- reference servers

@register
class NbdkitTarget(Target):
    name = "nbdkit"
    description = "nbdkit file plugin (C, plain)"

    def unavailable(self) -> str | None:
        return missing_tools("nbdkit")

    def _nbdkit(self, port: int, *extra: str) -> list[str]:
        return ["nbdkit", "--exit-with-parent", "-f", "-i", HOST, "-p", str(port), *extra]

    def _launch(self) -> str:
        with open(self.image, "wb") as f:
            f.truncate(self.size)
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

    def _launch(self) -> str:
        passfile = LuksImage.create(self)
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

    def _launch(self) -> str:
        passfile = LuksImage.create(self)
        port = free_port()
        # --persistent and --shared: fio, nbdcopy (up to 4 connections) and nbdinfo each
        # connect in turn, and qemu-nbd would otherwise exit after the first client.
        argv = ["qemu-nbd", "--object", f"secret,id={PASSPHRASE_ID},file={passfile}",
                "--image-opts", f"driver=luks,key-secret={PASSPHRASE_ID},file.filename={self.image}",
                "-b", HOST, "-p", str(port), "-x", "disk", "--persistent", "--shared=8",
                "--cache=writeback"]
        self._spawn(argv).wait_for_port(HOST, port, START_TIMEOUT)
        return f"nbd://{HOST}:{port}/disk"


def select(names: str | None) -> list[str]:
    """`"a,b"` -> those target names in the order given; None or "all" -> every registered one."""
    if not names or names == "all":
        return list(REGISTRY)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    return wanted
