"""Fixtures that run the real key service daemon as a process.

Readiness is the daemon's own sd_notify(READY=1) on a socket we hand it in
NOTIFY_SOCKET: a condition with a deadline, not a sleep.

`daemon` keeps its state where the `state` fixture says: SQLite unless a module
overrides `state` (`params=STATES` runs the module on SQLite and on a database of the
session's PostgreSQL server, tests/helpers/postgres.py).
"""
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from keyservice.client import Credential
from tests.helpers.platform import free_port

START_DEADLINE = 20.0


class Daemon:
    def __init__(self, data_dir: Path, extra_args=(), env=None):
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}-{self.port}.stderr"
        self.notify_path = str(self.data_dir.parent / f"{self.data_dir.name}-{self.port}.notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.extra_args = list(extra_args)
        self.env = dict(os.environ, NOTIFY_SOCKET=self.notify_path, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self._tokens: dict[str, str] = {}

    def start(self, expect_ready=True):
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keyservice", "serve", "--data-dir", str(self.data_dir),
             "--listen", f"127.0.0.1:{self.port}", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=self._stderr, env=self.env)
        if expect_ready:
            assert self.wait_notify("READY=1"), self.stderr()
        return self

    def wait_notify(self, message: str, deadline: float = START_DEADLINE) -> bool:
        self.notify.settimeout(deadline)
        try:
            while True:
                if message in self.notify.recv(4096).decode():
                    return True
        except TimeoutError:
            return False

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
        self._stderr.close()
        return self.proc.returncode if self.proc else 0

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def admin(self) -> Credential:
        return Credential.load(self.data_dir / "admin.credential")

    def token(self, cred: Credential) -> str:
        if cred.client_id not in self._tokens:
            status, body = self.http("POST", "/oauth2/token", {
                "grant_type": "client_credentials", "client_id": cred.client_id,
                "client_secret": cred.client_secret}, token=None)
            assert status == 200, body
            self._tokens[cred.client_id] = body["access_token"]
        return self._tokens[cred.client_id]

    def request_parts(self, body=None, *, as_=None, token="admin", raw: bytes | None = None,
                      headers=None) -> tuple[dict, bytes | None]:
        """The headers and body of a request: the bearer token (the admin's unless told
        otherwise, none with token=None) and the JSON or raw body."""
        hdrs = dict(headers or {})
        if token == "admin":
            token = self.token(as_ or self.admin)
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        return hdrs, data

    def http(self, method, path, body=None, *, as_=None, token="admin", raw: bytes | None = None,
             headers=None):
        """One request; returns (status, decoded JSON or None). `as_` is a Credential."""
        hdrs, data = self.request_parts(body, as_=as_, token=token, raw=raw, headers=headers)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        return status, (json.loads(payload) if payload else None)

    def identity(self, name, type_="managedIdentity", roles=()) -> Credential:
        status, body = self.http("POST", "/identities", {"displayName": name, "type": type_,
                                                         "roles": list(roles)})
        assert status == 201, body
        return Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])

    def cli(self, *args, cred_path=None, check=True):
        env = dict(os.environ, KEYSERVICE_URL=self.url,
                   KEYSERVICE_CREDENTIAL=str(cred_path or self.data_dir / "admin.credential"))
        env.pop("NOTIFY_SOCKET", None)
        r = subprocess.run([sys.executable, "-m", "keyservice", *args], capture_output=True,
                           text=True, env=env, timeout=60)
        if check:
            assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        return r


@pytest.fixture
def make_daemon(tmp_path):
    daemons = []

    def make(data_dir=None, extra_args=(), env=None, start=True):
        d = Daemon(data_dir or tmp_path / f"data{len(daemons)}", extra_args, env)
        daemons.append(d)
        return d.start() if start else d
    yield make
    for d in daemons:
        d.close()


STATES = ("sqlite", "postgresql")
_databases = itertools.count(1)


@pytest.fixture(scope="module")
def state():
    """Where the module's `daemon` keeps its state: "sqlite" or "postgresql"."""
    return "sqlite"


def state_args(request, state: str) -> list[str]:
    """`serve`'s arguments for `state`: a new database on the session's PostgreSQL."""
    if state == "sqlite":
        return []
    pg = request.getfixturevalue("postgres_server")
    return ["--state", pg.create_database(f"ks{os.getpid()}_{next(_databases)}")]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, request, state):
    d = Daemon(tmp_path_factory.mktemp("ks") / "data", state_args(request, state)).start()
    yield d
    d.close()


_counter = [0]


@pytest.fixture
def vault(daemon):
    """A fresh vault per test, so tests on the shared daemon do not interfere."""
    _counter[0] += 1
    name = f"vault{os.getpid() % 1000}x{_counter[0]}"
    status, body = daemon.http("POST", "/vaults", {"name": name, "location": "westeurope",
                                                   "subscription": "sub-1"})
    assert status == 201, body
    return name
