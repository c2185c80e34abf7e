"""Real server processes for end-to-end tests: start, wait until ready, check health, stop.

Every daemon of this project prints one readiness line on stdout once it accepts
connections (`LISTENING host port` for the NBD servers). `DaemonProcess` starts a
command, waits for that line with a deadline (never a sleep), keeps stderr in a file so
a chatty daemon cannot block on a full pipe, and offers the checks every e2e test ends
with: the process is alive and nothing it logged is a traceback.

    with BaselineServer(tmp_path, ["disk=/tmp/d.img,size=64M"]) as srv:
        h = nbd.NBD(); h.connect_uri(srv.uri("disk"))
        ...
        srv.assert_healthy()
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll `predicate` until it returns a true value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class DaemonProcess:
    """A daemon started as a real process, ready once it printed `ready_prefix` on stdout."""

    def __init__(self, argv: list[str], workdir: Path, *, ready_prefix: str = "LISTENING",
                 env: dict | None = None, name: str = "daemon"):
        self.argv = argv
        self.workdir = Path(workdir)
        self.ready_prefix = ready_prefix
        self.env = env
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.ready_line = ""
        self.stderr_path = self.workdir / f"{name}.{os.getpid()}.{id(self)}.stderr"

    def start(self) -> DaemonProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.env:
            env.update(self.env)
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._stderr)
        self.ready_line = self._read_ready()
        return self

    @property
    def process(self) -> subprocess.Popen:
        """The daemon's process; start() first."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc

    def _read_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT
        assert self.process.stdout is not None  # a pipe: start() asks for one
        fd = self.process.stdout.fileno()
        buf = b""
        while True:
            for line in buf.split(b"\n")[:-1]:
                if line.startswith(self.ready_prefix.encode()):
                    return line.decode()
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"{self.name} not ready in {READY_TIMEOUT}s; stderr:\n{self.stderr_text()}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.process.wait(timeout=5)
                    raise RuntimeError(f"{self.name} exited ({self.process.returncode}) before ready; "
                                       f"stderr:\n{self.stderr_text()}")
                buf += chunk

    # -- health
    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def assert_healthy(self) -> None:
        """The daemon still runs and logged no traceback (a bug, whatever the input was)."""
        text = self.stderr_text()
        assert "Traceback" not in text, f"{self.name} logged a traceback:\n{text[-4000:]}"
        assert self.alive(), f"{self.name} died (rc={self.process.returncode}):\n{text[-4000:]}"

    # -- stopping
    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait: the daemon's clean-shutdown path. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._close_files()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_files()

    def _close_files(self) -> None:
        if self.proc is not None and self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if not self._stderr.closed:
            self._stderr.close()

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        if self.alive():
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self._close_files()


class BaselineServer(DaemonProcess):
    """`python -m nbdserver.baseline` serving files: the NBD server without the platform."""

    def __init__(self, workdir: Path, exports: list[str], *, extra_args: Sequence[str] = (),
                 name: str = "nbdserver", env: dict | None = None):
        argv = [sys.executable, "-m", "nbdserver.baseline", "--listen", "127.0.0.1:0",
                *extra_args, *exports]
        super().__init__(argv, workdir, name=name, env=env)
        self.host = "127.0.0.1"
        self.port = 0

    def start(self) -> BaselineServer:
        super().start()
        _, self.host, port = self.ready_line.split()
        self.port = int(port)
        return self

    def uri(self, export: str = "") -> str:
        return f"nbd://{self.host}:{self.port}/{export}"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def stop_healthy(servers, *, skip_exited: bool = True) -> None:
    """Fixture teardown: every server still running must be healthy (no traceback) and
    exit 0 on SIGTERM; all are killed whatever happens. With `skip_exited`, a server the
    test already stopped is not checked again (the test checked it itself)."""
    problems = []
    for srv in servers:
        if skip_exited and srv.proc.poll() is not None:
            srv.kill()
            continue
        try:
            srv.assert_healthy()
            rc = srv.terminate()
            if rc != 0:
                problems.append(f"{srv.name} exited {rc} on SIGTERM:\n{srv.stderr_text()[-3000:]}")
        except AssertionError as e:
            problems.append(str(e))
        finally:
            srv.kill()
    assert not problems, "\n".join(problems)
