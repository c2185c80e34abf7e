"""The `nbdserver` client commands as an operator meets them: --version, the environment
in --help, the settings file, --output/--query, RFC 3339 times, the one error shape and
exit-code table, and the request timeout and whole-command deadline.

Real parts: both daemons as processes (the module's `stack`), the CLI as a subprocess,
a pseudo-terminal for "is stdout a terminal", a listener that never answers and a FIFO
nobody writes for the timeouts. No timing is asserted: subprocess timeouts stop hangs.
"""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.servers import ROOT

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
STOP_A_HANG = 90  # seconds; far beyond the deadlines under test
NBD_VARS = ("NBDSERVER_API", "NBDSERVER_TOKEN", "NBDSERVER_TOKEN_FILE", "NBDSERVER_TIMEOUT")


def run(*args, env: dict, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbdserver.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, stdin=stdin, timeout=STOP_A_HANG)


def bare_env(tmp_path: Path, **extra) -> dict:
    """No NBDSERVER_* from the caller's shell, and a settings directory of the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBDSERVER_", "ENCRYPTED_DISKS"))}
    env.pop("NOTIFY_SOCKET", None)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def write_settings(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "xdg" / "encrypted-disks" / "config"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def error_of(r: subprocess.CompletedProcess) -> tuple[str, dict]:
    """The human line and the JSON object of a failed command's stderr (--output json)."""
    lines = r.stderr.strip().splitlines()
    return lines[-2], json.loads(lines[-1])["error"]


def test_version_and_the_environment_in_every_commands_help(tmp_path):
    env = bare_env(tmp_path)
    r = run("--version", env=env)
    assert r.returncode == 0 and re.match(r"nbdserver, version \d+\.\d+", r.stdout), r.stdout
    # Every variable the client reads (client.SETTINGS.get/seconds("...")) is in the help.
    source = (ROOT / "nbdserver" / "client.py").read_text()
    read = set(re.findall(r'SETTINGS\.(?:get|seconds)\("([A-Z_]+)"', source))
    assert read >= set(NBD_VARS), read
    for cmd in (("disk", "list"), ("disk", "create"), ("des", "show"), ("snapshot", "create"),
                ("operation", "wait"), ("disk", "resize")):
        text = run(*cmd, "--help", env=env).stdout
        assert all(v in text for v in read), (cmd, text)
        assert "encrypted-disks/config" in text and "--output" in text and "--query" in text
    text = run("attach", "--help", env=env).stdout  # a host command: the API's and its own
    assert all(v in text for v in read) and "NBDSERVER_RUN_DIR" in text, text


def test_the_settings_file_replaces_the_exports_and_the_environment_wins(stack, tmp_path):
    stack.create_disk("cfg1", "--size", "1M")
    write_settings(tmp_path, f"[nbdserver]\nNBDSERVER_API = {stack.api_url}\n"
                             f"NBDSERVER_TOKEN_FILE = {stack.nb.token_file}\n")
    r = run("disk", "show", "cfg1", env=bare_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "cfg1"
    # The environment wins over the file: a dead API in the environment is the one used.
    r = run("disk", "show", "cfg1", env=bare_env(tmp_path, NBDSERVER_API="http://127.0.0.1:9"))
    assert r.returncode == 3, r.stderr
    human, err = error_of(r)
    assert "127.0.0.1:9" in err["message"] and "connection refused" in human, r.stderr


def test_a_settings_file_holding_the_token_must_be_private(stack, tmp_path):
    token = stack.nb.token_file.read_text().strip()
    path = write_settings(tmp_path, f"[nbdserver]\nNBDSERVER_API = {stack.api_url}\n"
                                    f"NBDSERVER_TOKEN = {token}\n", mode=0o644)
    r = run("disk", "list", env=bare_env(tmp_path))
    assert r.returncode == 2 and r.stdout == "", r
    human, err = error_of(r)
    assert "chmod 600" in human and err["code"] == "BadSettings", r.stderr
    assert token not in r.stderr
    path.chmod(0o600)
    r = run("disk", "list", env=bare_env(tmp_path))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("text, says", [
    ("[nbdserver]\nNBDSERVER_APO = http://x\n", "unknown key(s) NBDSERVER_APO"),
    ("not an ini file\n", "not valid INI"),
])
def test_a_bad_settings_file_is_refused_with_what_is_wrong(tmp_path, text, says):
    write_settings(tmp_path, text)
    r = run("disk", "list", env=bare_env(tmp_path))
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_output_formats_query_and_rfc3339_times(stack):
    stack.create_disk("fmt-a", "--size", "1M")
    stack.create_disk("fmt-b", "--size", "2M")
    env = stack.env
    # Not a terminal: JSON by default, times in RFC 3339.
    disks = json.loads(run("disk", "list", env=env).stdout)
    mine = [d for d in disks if d["name"].startswith("fmt-")]
    assert len(mine) == 2 and all(RFC3339.match(d["created"]) for d in mine), mine
    r = run("disk", "list", "-o", "tsv", "--query", "[?starts_with(name, 'fmt-')].[name, size]", env=env)
    assert r.stdout.splitlines() == ["fmt-a\t1048576", "fmt-b\t2097152"], r.stdout
    r = run("disk", "list", "-o", "table", "--query", "[?starts_with(name, 'fmt-')].{name: name, size: size}",
            env=env)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE"] and lines[1].split() == ["fmt-a", "1048576"], r.stdout
    r = run("disk", "show", "fmt-a", "--query", "encryption.type", "-o", "tsv", env=env)
    assert r.stdout.strip() == "EncryptionAtRestWithPlatformKey"
    r = run("disk", "list", "--query", "[?", env=env)
    assert r.returncode == 2 and "JMESPath" in r.stderr, r.stderr


def test_a_terminal_gets_a_table(stack):
    stack.create_disk("tty1", "--size", "1M")
    leader, follower = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "nbdserver.cli", "disk", "show", "tty1"],
                           stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           cwd=ROOT, env=stack.env, timeout=STOP_A_HANG)
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    text = b"".join(chunks).decode()
    assert p.returncode == 0, p.stderr
    rows = {p[0]: p[-1] for p in (line.split(None, 1) for line in text.splitlines()) if p}
    assert rows["name"].strip() == "tty1" and RFC3339.match(rows["created"].strip()), text


def test_one_error_shape_and_the_exit_code_table(stack):
    env = stack.env
    r = run("disk", "show", "nosuchdisk", env=env)
    assert r.returncode == 1 and r.stdout == ""
    human, err = error_of(r)
    assert human.startswith("error: ") and "[NotFound, HTTP 404]" in human, human
    assert err == {"code": "NotFound", "message": err["message"], "status": 404}
    r = run("disk", "show", "nosuchdisk", "-o", "table", env=env)
    assert r.returncode == 1 and r.stderr.strip() == human  # no JSON for a person
    r = run("disk", "create", env=env)
    assert r.returncode == 2 and "Missing argument" in r.stderr
    r = run("disk", "list", env=dict(env, NBDSERVER_TOKEN="wrong"))
    assert r.returncode == 1 and error_of(r)[1]["status"] == 401


@pytest.fixture
def silent_api():
    """A listener that never accepts: a request connects, is sent, and is never answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_silent_api_is_reported_after_the_request_timeout(silent_api, tmp_path):
    r = run("disk", "list", env=bare_env(tmp_path, NBDSERVER_API=silent_api, NBDSERVER_TOKEN="t",
                                         NBDSERVER_TIMEOUT="1"))
    assert r.returncode == 3, r.stderr
    human, err = error_of(r)
    assert "did not answer within 1 s" in human and err["code"] == "ServiceUnavailable", r.stderr


def test_a_command_stuck_outside_any_request_ends_at_its_deadline(silent_api, tmp_path):
    fifo = tmp_path / "token.fifo"  # opening it blocks in the kernel: no request timeout helps
    os.mkfifo(fifo)
    r = run("disk", "list", env=bare_env(tmp_path, NBDSERVER_API=silent_api,
                                         NBDSERVER_TOKEN_FILE=str(fifo), NBDSERVER_TIMEOUT="0.5"))
    assert r.returncode == 3 and r.stdout == "", r.stderr
    human, err_json, stacks = r.stderr.split("\n", 2)
    assert human.startswith("error: nbdserver disk list: not done within its deadline"), human
    assert json.loads(err_json)["error"]["code"] == "Timeout"
    assert "token" in stacks, stacks  # where it stuck: client.token()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "1e9"])
def test_a_bad_timeout_is_a_usage_error(tmp_path, value):
    r = run("disk", "list", env=bare_env(tmp_path, NBDSERVER_TIMEOUT=value))
    assert r.returncode == 2 and "NBDSERVER_TIMEOUT" in r.stderr and "Traceback" not in r.stderr
