"""systemd/: every unit passes `systemd-analyze verify` as scripts/install lays it out, and
both daemons speak sd_notify as Type=notify needs: READY=1 only once their ports accept
connections, WATCHDOG=1 when asked, STOPPING=1 on SIGTERM.

systemd is not PID 1 here, so verify runs offline against a root directory that
scripts/install filled (units, config, secrets, /usr/local/bin/*) plus a copy of the
distribution's units (targets such as sysinit.target that ours depend on)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.helpers.platform import KeyServiceProcess, free_port
from tests.helpers.servers import ROOT
from tests.host.hostutil import require_root, require_tools, sh

pytestmark = pytest.mark.timeout(120)
UNITS = ["keyservice.service", "nbdserver.service", "nbd-attach@data-1.service"]
DEADLINE = 30.0


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A root directory as scripts/install leaves a host with a local key service."""
    require_root()
    require_tools("systemd-analyze")
    root = tmp_path_factory.mktemp("root")
    sh(ROOT / "scripts/install", "--root", root, "--local-keyservice",
       "--bin-from", ROOT / ".venv/bin")
    # The links point into this checkout's venv, outside the root directory that verify
    # resolves paths in: give the root a real copy of each entry point, still executable.
    for b in ("nbdserver", "keyservice"):
        link = root / "usr/local/bin" / b
        assert os.readlink(link) == str(ROOT / ".venv/bin" / b)
        link.unlink()
        shutil.copy2(ROOT / ".venv/bin" / b, link)
    dist = root / "usr/lib/systemd/system"
    shutil.copytree("/usr/lib/systemd/system", dist, symlinks=True)
    return root


def test_every_unit_verifies(installed):
    units = installed / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == sorted(
        ["keyservice.service", "nbdserver.service", "nbd-attach@.service", "nbdserver.service.d"])
    r = sh("systemd-analyze", "verify", f"--root={installed}", *UNITS, check=False, cwd=units)
    # verify exits 0 on mere warnings (an unknown key is "ignoring"): no output is the bar.
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stderr + r.stdout


def test_verify_notices_a_missing_program(installed, tmp_path):
    """The check above is not vacuous: a unit whose ExecStart binary is missing fails."""
    bad = tmp_path / "root"
    shutil.copytree(installed, bad, symlinks=True)
    (bad / "usr/local/bin/nbdserver").unlink()
    r = sh("systemd-analyze", "verify", f"--root={bad}", "nbdserver.service", check=False,
           cwd=bad / "etc/systemd/system")
    assert r.returncode != 0 and "/usr/local/bin/nbdserver" in r.stderr


def test_daemons_are_hardened(installed):
    for unit in ("keyservice.service", "nbdserver.service"):
        r = sh("systemd-analyze", "security", "--offline=yes", f"--root={installed}", unit,
               cwd=installed / "etc/systemd/system")
        level = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout).group(1))
        assert level <= 2.0, r.stdout  # systemd's scale: 0 safest .. 10; "OK" is below 4
        text = (installed / "etc/systemd/system" / unit).read_text()
        for line in ("Type=notify", "DynamicUser=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                     "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                     "SystemCallFilter=@system-service", "LoadCredential="):
            assert line in text, f"{unit} lacks {line!r}"


def test_install_lays_out_config_and_secrets(installed, tmp_path):
    etc = installed / "etc/encrypted-disks"
    for name in ("keyservice-master-key", "nbdserver-master-key"):
        st = (etc / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 32, name
    assert stat.S_IMODE(etc.stat().st_mode) == 0o700
    assert "KEYSERVICE_URL=https://127.0.0.1:8443" in (etc / "nbdserver.env").read_text()
    for d in ("keyservice-tls", "nbd-tls"):
        assert stat.S_IMODE((etc / d / "server-key.pem").stat().st_mode) == 0o600, d
    assert (etc / "keyservice-ca.pem").read_bytes() == (etc / "keyservice-tls/ca-cert.pem").read_bytes()
    # Every file a unit loads as a credential is in place.
    for unit in ("keyservice.service", "nbdserver.service"):
        for line in (installed / "etc/systemd/system" / unit).read_text().splitlines():
            if line.startswith("LoadCredential="):
                path = line.split(":", 1)[1]
                if not path.endswith("nbdserver-keyservice.credential"):  # made at first start
                    assert (installed / path.lstrip("/")).is_file(), f"{unit}: {path}"
    drop_in = installed / "etc/systemd/system/nbdserver.service.d/local-keyservice.conf"
    assert "Requires=keyservice.service" in drop_in.read_text()
    # A second install keeps the secrets and the operator's settings.
    key = (etc / "nbdserver-master-key").read_bytes()
    (etc / "nbdserver.env").write_text("NBD_LISTEN=10.0.0.1:10809\n")
    sh(ROOT / "scripts/install", "--root", installed, "--bin-from", ROOT / ".venv/bin")
    assert (etc / "nbdserver-master-key").read_bytes() == key
    assert (etc / "nbdserver.env").read_text() == "NBD_LISTEN=10.0.0.1:10809\n"


def test_install_keeps_no_ca_key_unless_asked(installed, tmp_path):
    """A CA key on the host would let anyone who reads it mint certificates every peer
    trusts: install signs this host's certificates and keeps the CA key only where asked."""
    assert not list(installed.rglob("ca-key.pem")), "a CA private key was left on the host"
    etc = installed / "etc/encrypted-disks"
    for d in ("keyservice-tls", "nbd-tls"):
        r = sh("openssl", "verify", "-CAfile", etc / d / "ca-cert.pem", etc / d / "server-cert.pem",
               check=False)
        assert r.returncode == 0, (d, r.stdout, r.stderr)
    root, media = tmp_path / "root", tmp_path / "media"
    sh(ROOT / "scripts/install", "--root", root, "--local-keyservice",
       "--bin-from", ROOT / ".venv/bin", "--keep-ca-keys", media)
    assert not list(root.rglob("ca-key.pem"))
    assert sorted(p.name for p in media.iterdir()) == ["keyservice-ca-key.pem", "nbd-ca-key.pem"]
    for p in media.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


# --------------------------------------------------------------------------- sd_notify
class NotifySocket:
    """The systemd side of sd_notify: an AF_UNIX datagram socket the daemon writes to."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen: list[str] = []

    def next(self, deadline: float) -> str | None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.seen.append(msg)
        return msg

    def close(self):
        self.sock.close()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_ready_then_check(notify: NotifySocket, proc, ports: list[int]) -> None:
    """On the READY=1 datagram, every port must accept right then: a READY=1 sent before
    the listener was bound would find a port that refuses."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        msg = notify.next(deadline)
        if msg is None:
            break
        if "READY=1" in msg:
            assert all(accepts(p) for p in ports), f"READY=1 before ports {ports} accepted"
            return
        assert proc.poll() is None
    raise AssertionError(f"no READY=1 in {DEADLINE}s (rc={proc.poll()}; got {notify.seen})")


def wait_message(notify: NotifySocket, text: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        msg = notify.next(deadline)
        if msg and text in msg:
            return
    raise AssertionError(f"no {text} in {DEADLINE}s; got {notify.seen}")


def _env(notify: NotifySocket, **extra) -> dict:
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, PYTHONPATH=str(ROOT), **extra)
    env.pop("WATCHDOG_USEC", None)
    env.update(extra)
    return env


def test_keyservice_ready_only_once_its_port_accepts(tmp_path):
    notify = NotifySocket(tmp_path / "notify")
    port = free_port()
    with open(tmp_path / "ks.stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "keyservice", "serve", "--data-dir",
                                 tmp_path / "ks", "--listen", f"127.0.0.1:{port}"],
                                env=_env(notify), stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_ready_then_check(notify, proc, [port])
        proc.send_signal(signal.SIGTERM)
        wait_message(notify, "STOPPING=1")
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_nbdserver_ready_only_once_both_ports_accept_then_watchdog(tmp_path):
    ks = KeyServiceProcess(tmp_path, tmp_path / "ks", free_port()).start()
    notify = NotifySocket(tmp_path / "notify")
    nbd_port, api_port = free_port(), free_port()
    with open(tmp_path / "nbd.stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdserver.cli", "serve", "--data-dir", tmp_path / "nb",
             "--nbd-listen", f"127.0.0.1:{nbd_port}", "--api-listen", f"127.0.0.1:{api_port}",
             "--keyservice-url", ks.url, "--keyservice-credential", ks.admin_credential],
            env=_env(notify, WATCHDOG_USEC="200000"), stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_ready_then_check(notify, proc, [nbd_port, api_port])
        wait_message(notify, "WATCHDOG=1")
        wait_message(notify, "WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        wait_message(notify, "STOPPING=1")
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        ks.terminate()
    assert "Traceback" not in (tmp_path / "nbd.stderr").read_text()
