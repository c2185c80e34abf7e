"""A throwaway PostgreSQL server, for the tests and the demo of state on PostgreSQL.

Debian's PostgreSQL binaries (`/usr/lib/postgresql/<major>/bin`), `initdb` in a private
directory, the server listening on a unix socket in that directory only (no TCP: the
port number only names the socket), trust authentication (the directory is 0700, so
only its owner and root reach the socket). Nothing global is read or written (no
/etc/postgresql, no pg_ctlcluster, no systemd).

Why this shape:
- postgres refuses to run as root: when we are root, the cluster belongs to the
  `postgres` system user (Debian's package creates it), else to us.
- The directory is made with `mkdtemp` under the system's temp directory, not inside
  pytest's `tmp_path`: pytest's base directory is 0700 root, which the `postgres`
  user cannot traverse.
- fsync off, full_page_writes off: a test cluster's data need not survive a power
  cut, and every commit would otherwise wait for the disk. `synchronous_commit` stays
  on, so a committed transaction is in the server's WAL before the client hears of it:
  a client killed -9 after an answer loses nothing, which is what the tests check.
- One server per test session, a database per test (`create_database`): a database
  costs a few milliseconds, a server a second or two.

    with PostgresServer() as pg:
        dsn = pg.create_database("t1")   # postgresql://postgres@/t1?host=...&port=...

Scripts use the same code: `python -m tests.helpers.postgres start DIR` starts a server
whose files are in DIR and prints the DSN of its `postgres` database,
`python -m tests.helpers.postgres stop DIR` stops it and removes DIR.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 60.0    # initdb plus the first accepted connection, on a loaded machine
STOP_TIMEOUT = 30.0
SYSTEM_USER = "postgres"  # Debian's postgresql-common creates it
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian: one per major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def missing() -> str | None:
    """None if a server can be started here, else why not (for a skip message)."""
    gone = []
    if bin_dir() is None:
        gone.append("postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        gone.append("psycopg")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            gone.append(f"the {SYSTEM_USER} user")
    return (f"PostgreSQL is not usable here ({', '.join(gone)}): scripts/lib/bootstrap.sh "
            "installs it") if gone else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in `root` (made if None); `start()` / `stop()`, or a context."""

    def __init__(self, root: Path | None = None, port: int | None = None):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="pg-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self._user = SYSTEM_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.start_seconds = 0.0

    # -- addresses --
    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.root}&port={self.port}"

    # -- lifecycle --
    def _as_owner(self) -> dict:
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam(SYSTEM_USER)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self) -> PostgresServer:
        bins = bin_dir()
        if bins is None:
            raise RuntimeError(missing() or "PostgreSQL is not installed")
        began = time.monotonic()
        os.chmod(self.root, 0o700)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        log = open(self.root / "postgres.log", "ab")
        if not (self.data / "PG_VERSION").exists():
            subprocess.run([str(bins / "initdb"), "-D", str(self.data), "-U", "postgres",
                            "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
                           stdout=log, stderr=log, check=True, cwd=self.root, **self._as_owner())
        (self.root / "port").write_text(f"{self.port}\n")
        self.proc = subprocess.Popen(
            [str(bins / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.root), "-c", "listen_addresses=", "-c", "fsync=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200",
             "-c", "unix_socket_permissions=0700"],
            stdout=log, stderr=log, cwd=self.root, start_new_session=True, **self._as_owner())
        log.close()
        self._wait_ready()
        self.start_seconds = time.monotonic() - began
        return self

    def _wait_ready(self) -> None:
        import psycopg
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres not ready after {START_TIMEOUT}s:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.root / "postgres.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def create_database(self, name: str) -> str:
        """A new empty database; its DSN."""
        import psycopg
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits, _ only")
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self, remove: bool = True) -> None:
        """Fast shutdown (SIGINT: clients disconnected, no waiting for them), then the
        directory goes unless `remove` is false."""
        pid = self._pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pid = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif pid is not None:  # started by another process (the script's `start`)
            deadline = time.monotonic() + STOP_TIMEOUT
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def restart(self, while_down=None) -> PostgresServer:
        """Stop (fast: every client connection cut), call `while_down()` if given, start
        again on the same directory and port: an outage under running clients."""
        self.stop(remove=False)
        self.proc = None
        if while_down is not None:
            while_down()
        return self.start()

    def _pid(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid if self.proc.poll() is None else None
        try:  # postmaster.pid's first line is the postmaster's pid
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.helpers.postgres",
                                description="A throwaway PostgreSQL server in DIR.")
    sub = p.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="initdb DIR (if new), start, print the DSN")
    start.add_argument("dir", type=Path)
    start.add_argument("--database", help="also create this database and print its DSN")
    stop = sub.add_parser("stop", help="stop the server in DIR and remove DIR")
    stop.add_argument("dir", type=Path)
    stop.add_argument("--keep", action="store_true", help="keep DIR")
    args = p.parse_args(argv)
    if args.cmd == "start":
        why = missing()
        if why:
            print(why, file=sys.stderr)
            return 1
        srv = PostgresServer(args.dir).start()
        srv.proc = None  # it outlives this process; `stop` finds it by postmaster.pid
        print(srv.create_database(args.database) if args.database else srv.dsn())
        return 0
    port_file = args.dir / "port"
    if not port_file.exists():
        print(f"{args.dir}: no server started there", file=sys.stderr)
        return 1
    PostgresServer(args.dir, int(port_file.read_text())).stop(remove=not args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
