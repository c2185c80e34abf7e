"""A server under test as a child process: started, waited for, and always torn down.

Readiness is a condition with a deadline, never a fixed sleep: either a line the server
prints once it listens (our baseline prints `LISTENING host port`), or a TCP connect that
succeeds. The child gets PR_SET_PDEATHSIG so that it dies with the harness even if the
harness itself is killed with SIGKILL and no `finally` runs.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO

PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """The server exited or did not become ready before its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. For servers that cannot report the port they bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerProcess:
    def __init__(self, argv: list[str], log_path: Path, *, env: dict | None = None):
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log: BinaryIO | None = None
        self._drain: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, *, capture_stdout: bool = False) -> None:
        # stderr goes straight to a file so a chatty server can never block on a full pipe.
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else self._log, stderr=self._log,
            env=self.env, preexec_fn=_die_with_parent,
        )

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with `prefix`; later output is copied to the log."""
        assert self.proc and self.proc.stdout and self._log, "start(capture_stdout=True) first"
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._log.write(line + b"\n")
                    text = line.decode(errors="replace")
                    if text.startswith(prefix):
                        self._log.write(buf)
                        self._log.flush()
                        self._start_drain()
                        return text
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerStartError(f"no {prefix!r} line within {timeout:g}s{self._tail()}")
                if not sel.select(left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise ServerStartError(f"exited with status {self.proc.returncode}{self._tail()}")
                buf += chunk

    def _start_drain(self) -> None:
        assert self.proc is not None
        def drain(src, dst):
            for chunk in iter(lambda: src.read1(65536), b""):
                dst.write(chunk)
        self._drain = threading.Thread(target=drain, args=(self.proc.stdout, self._log), daemon=True)
        self._drain.start()

    def wait_for_port(self, host: str, port: int, timeout: float) -> None:
        """Until a TCP connect to host:port succeeds; fails early if the server exits."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        assert self.proc is not None, "start() first"
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(f"exited with status {self.proc.returncode}{self._tail()}")
            try:
                with socket.create_connection((host, port), timeout=1):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise ServerStartError(f"port {host}:{port} not open within {timeout:g}s{self._tail()}")
            # Backing off between connect attempts is polling a condition, not a sleep-as-sync.
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Safe to call more than once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._drain is not None:
            self._drain.join(timeout=grace)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _tail(self, lines: int = 5) -> str:
        if self._log:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return (": " + " | ".join(text)) if text else ""


# -- CPU time of a server, from /proc (proc(5))

def stat_cpu_ticks(stat: str) -> tuple[int, int]:
    """(ppid, utime + stime + cutime + cstime in clock ticks) from a /proc/PID/stat line.

    A process's utime/stime are those of all its threads, exited ones included; cutime/
    cstime add its children that exited and were waited for. The command name (field 2)
    may hold spaces and parentheses, so the fields are counted from the last ')'."""
    rest = stat[stat.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): field N is rest[N - 3].
    ppid = int(rest[4 - 3])
    return ppid, sum(int(rest[n - 3]) for n in (14, 15, 16, 17))


def process_tree_cpu(pid: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds used so far by `pid` and by every live process below it (a server made
    of several processes is measured whole). None of its time is lost when a thread or
    a waited-for child exits; a child still running is counted through the walk."""
    ticks: dict[int, int] = {}
    parent: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid, t = stat_cpu_ticks((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not a process
            continue
        ticks[int(entry.name)] = t
        parent[int(entry.name)] = ppid
    if pid not in ticks:
        raise ProcessLookupError(pid)
    children: dict[int, list[int]] = {}
    for p, pp in parent.items():
        children.setdefault(pp, []).append(p)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += ticks[p]
        todo.extend(children.get(p, ()))
    return total / os.sysconf("SC_CLK_TCK")
