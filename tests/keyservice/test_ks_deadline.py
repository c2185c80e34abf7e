"""The CLI never hangs: every request has a timeout (the token fetch too), and the whole
command a deadline (`daemonkit/deadline.py`). Seen once in CI: `keyservice vault create`
printed nothing for 120 s and was killed, so nobody learnt where it stuck.

Real parts: the CLI as a subprocess, a real listening socket that never answers, a real
FIFO nobody writes. No timing is asserted: the subprocess timeout only stops a hang.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STOP_A_HANG = 90  # seconds; far beyond the deadlines under test


def run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "keyservice", *args], capture_output=True,
                          text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=STOP_A_HANG,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


@pytest.fixture
def silent_service():
    """A TCP listener that never accepts: the kernel completes the handshakes into its
    backlog, so a client connects, sends, and waits for an answer that never comes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def credential(tmp_path):
    path = tmp_path / "cred.json"
    path.write_text(json.dumps({"client_id": "c", "client_secret": "s", "tenant_id": "t",
                                "object_id": "o"}))
    return path


def test_a_silent_service_is_reported_unreachable_not_waited_for(silent_service, credential):
    # The first request is the token fetch: it has the same timeout as every other call.
    r = run_cli("vault", "create", "v1", "--location", "l", "--subscription", "s",
                env={"KEYSERVICE_URL": silent_service, "KEYSERVICE_CREDENTIAL": str(credential),
                     "KEYSERVICE_TIMEOUT": "1"})
    assert r.returncode == 3, r.stderr
    err = json.loads(r.stderr.splitlines()[-1])["error"]
    assert err["code"] == "ServiceUnavailable" and "unreachable" in err["message"], err
    assert "TimeoutError" in err["message"] or "no answer in time" in err["message"], err  # named, not repr


def test_a_command_stuck_outside_any_request_ends_at_its_deadline(silent_service, tmp_path):
    # Opening a FIFO that nobody writes blocks in the kernel, where no request timeout
    # reaches: the deadline must end the command, say why, and show where it stuck.
    fifo = tmp_path / "cred.fifo"
    os.mkfifo(fifo)
    r = run_cli("vault", "show", "v1",
                env={"KEYSERVICE_URL": silent_service, "KEYSERVICE_CREDENTIAL": str(fifo),
                     "KEYSERVICE_TIMEOUT": "0.5"})
    assert r.returncode == 3, r.stderr
    human, err_json, stacks = r.stderr.split("\n", 2)
    err = json.loads(err_json)["error"]
    assert human.startswith("error: ") and "deadline" in human, human
    assert err["code"] == "Timeout" and "keyservice vault show" in err["message"], err
    assert "deadline" in err["message"] and "load" in stacks, r.stderr  # Credential.load
    assert r.stdout == ""


@pytest.mark.parametrize("value", ["0", "-1", "soon", "1e9"])
def test_a_bad_timeout_is_a_usage_error(silent_service, credential, value):
    r = run_cli("vault", "show", "v1",
                env={"KEYSERVICE_URL": silent_service, "KEYSERVICE_CREDENTIAL": str(credential),
                     "KEYSERVICE_TIMEOUT": value})
    assert r.returncode == 2 and "KEYSERVICE_TIMEOUT" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
