"""The `keyservice` client commands as an operator meets them: --version, the environment
in --help, the settings file, --output/--query, RFC 3339 times, the one error shape,
and credential files that are wrong in the ways people get them wrong.

Real parts: the daemon as a process (the module's `daemon`), the CLI as a subprocess.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
KS_VARS = ("KEYSERVICE_URL", "KEYSERVICE_CREDENTIAL", "KEYSERVICE_TIMEOUT", "KEYSERVICE_CA")


def run(*args, env):
    return subprocess.run([sys.executable, "-m", "keyservice", *args], capture_output=True, text=True,
                          cwd=ROOT, stdin=subprocess.DEVNULL, timeout=90, env=env)


def bare_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYSERVICE_", "ENCRYPTED_DISKS"))}
    env.pop("NOTIFY_SOCKET", None)
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(ROOT), **extra)
    return env


def daemon_env(daemon, tmp_path, **extra):
    return bare_env(tmp_path, KEYSERVICE_URL=daemon.url,
                    KEYSERVICE_CREDENTIAL=str(daemon.data_dir / "admin.credential"), **extra)


def error_of(r):
    lines = r.stderr.strip().splitlines()
    return lines[-2], json.loads(lines[-1])["error"]


def test_version_and_the_environment_in_every_commands_help(tmp_path):
    env = bare_env(tmp_path)
    r = run("--version", env=env)
    assert r.returncode == 0 and re.match(r"keyservice, version \d+\.\d+", r.stdout), r.stdout
    source = (ROOT / "keyservice" / "cli.py").read_text()
    # Every setting is a client's, shown in every command's help, but the server's state,
    # which only the commands that open it read and name.
    assert set(re.findall(r'SETTINGS\.(?:get|seconds)\("([A-Z_]+)"', source)) == {*KS_VARS, "KEYSERVICE_STATE"}
    for cmd in (("serve",), ("rotate-master-key",)):
        assert "KEYSERVICE_STATE" in run(*cmd, "--help", env=env).stdout, cmd
    for cmd in (("vault", "list"), ("key", "show"), ("identity", "list"), ("audit", "show")):
        text = run(*cmd, "--help", env=env).stdout
        assert all(v in text for v in KS_VARS) and "--output" in text, (cmd, text)


def test_the_settings_file_replaces_the_exports(daemon, tmp_path):
    cfg = tmp_path / "xdg" / "encrypted-disks" / "config"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"[keyservice]\nKEYSERVICE_URL = {daemon.url}\n"
                   f"KEYSERVICE_CREDENTIAL = {daemon.data_dir / 'admin.credential'}\n")
    r = run("vault", "list", env=bare_env(tmp_path))
    assert r.returncode == 0 and "value" in json.loads(r.stdout), r.stderr
    r = run("vault", "list", env=bare_env(tmp_path, KEYSERVICE_URL="http://127.0.0.1:9"))
    assert r.returncode == 3 and error_of(r)[1]["code"] == "ServiceUnavailable", r.stderr
    cfg.unlink()
    r = run("vault", "list", env=bare_env(tmp_path))
    assert r.returncode == 2 and "set KEYSERVICE_URL and KEYSERVICE_CREDENTIAL" in r.stderr


def test_output_formats_and_rfc3339_times(daemon, tmp_path):
    env = daemon_env(daemon, tmp_path)
    assert run("vault", "create", "fmtvault", "--location", "l", "--subscription", "s", env=env).returncode == 0
    k = json.loads(run("key", "create", "fmtvault", "k1", "--size", "2048", env=env).stdout)
    attrs = k["attributes"]
    assert RFC3339.match(attrs["created"]) and RFC3339.match(attrs["updated"]), attrs
    r = run("key", "list", "fmtvault", "-o", "tsv", "--query", "value[].kid", env=env)
    assert r.stdout.strip().endswith("/vaults/fmtvault/keys/k1"), r.stdout
    r = run("vault", "show", "fmtvault", "-o", "table", env=env)
    rows = {p[0]: p[-1] for p in (line.split(None, 1) for line in r.stdout.splitlines()) if p}
    assert rows["name"] == "fmtvault" and RFC3339.match(rows["createdDate"]), r.stdout


def test_one_error_shape(daemon, tmp_path):
    env = daemon_env(daemon, tmp_path)
    r = run("vault", "show", "novault", env=env)
    assert r.returncode == 1 and r.stdout == ""
    human, err = error_of(r)
    assert human.startswith("error: ") and "[VaultNotFound, HTTP 404]" in human, human
    assert err["code"] == "VaultNotFound" and err["status"] == 404
    r = run("vault", "show", "novault", "-o", "table", env=env)
    assert r.returncode == 1 and r.stderr.strip() == human


@pytest.mark.parametrize("content, says", [
    ("{not json", "is not JSON"),
    ('{"client_id": "c", "client_secret": "s"}', "lacks 'tenant_id'"),
    (None, "cannot read credential file"),
])
def test_a_malformed_credential_file_is_named_with_what_is_wrong(daemon, tmp_path, content, says):
    path = tmp_path / "cred.json"
    if content is not None:
        path.write_text(content)
    r = run("vault", "list", env=bare_env(tmp_path, KEYSERVICE_URL=daemon.url,
                                          KEYSERVICE_CREDENTIAL=str(path)))
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
