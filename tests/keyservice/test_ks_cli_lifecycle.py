"""Lifecycle commands of the `keyservice` CLI: `key update`, the identity commands across
tenants (an admin of one tenant sees and touches only its own), `reset-secret`, and
`audit show --tail/--since`.

Real parts: the daemon as a process (a fresh one per test where tenants matter), the
CLI as a subprocess.
"""
import base64
import json
import re
import uuid

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def out(r):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def error_of(r):
    return json.loads(r.stderr.strip().splitlines()[-1])["error"]


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def test_key_update_sets_and_clears_expiry_not_before_ops_and_enabled(daemon):
    cli = daemon.cli
    out(cli("vault", "create", "updvault", "--location", "l", "--subscription", "s"))
    out(cli("key", "create", "updvault", "k", "--size", "2048"))
    k = out(cli("key", "update", "updvault", "k", "--expires", "2030-01-01T00:00:00Z",
                "--not-before", "2020-01-01T00:00:00+01:00"))
    assert k["attributes"]["exp"] == "2030-01-01T00:00:00Z"
    assert k["attributes"]["nbf"] == "2019-12-31T23:00:00Z"
    wrapped = out(cli("key", "wrap", "updvault", "k", "--value", b64u(b"d" * 32)))

    k = out(cli("key", "update", "updvault", "k", "--ops", "wrapKey"))
    assert k["key"]["key_ops"] == ["wrapKey"]
    r = cli("key", "unwrap", "updvault", "k", "--value", wrapped["value"], check=False)
    assert r.returncode == 1 and "key_ops" in error_of(r)["message"]
    out(cli("key", "update", "updvault", "k", "--ops", "wrapKey,unwrapKey"))
    out(cli("key", "unwrap", "updvault", "k", "--value", wrapped["value"]))

    out(cli("key", "update", "updvault", "k", "--not-before", "none", "--expires", "2021-01-01T00:00:00Z"))
    r = cli("key", "wrap", "updvault", "k", "--value", b64u(b"d" * 32), check=False)
    assert r.returncode == 1 and "expired" in r.stderr
    k = out(cli("key", "update", "updvault", "k", "--expires", "never", "--disable"))
    assert "exp" not in k["attributes"] and "nbf" not in k["attributes"]
    assert k["attributes"]["enabled"] is False
    k = out(cli("key", "update", "updvault", "k", "--enable"))
    assert k["attributes"]["enabled"] is True

    r = cli("key", "update", "updvault", "k", "--expires", "tomorrow", check=False)
    assert r.returncode == 2 and "RFC 3339" in r.stderr and "never" in r.stderr
    r = cli("key", "update", "updvault", "k", check=False)
    assert r.returncode == 2 and "give at least one of" in r.stderr


def test_identity_commands_stay_in_their_tenant(make_daemon, tmp_path):
    d = make_daemon()
    home_mi = out(d.cli("identity", "create", "home-mi"))
    # The home admin founds tenant B with an admin of its own.
    b_cred = tmp_path / "b-admin.credential"
    b_admin = out(d.cli("identity", "create", "b-admin", "--role", "admin", "--tenant-id",
                        str(uuid.uuid4()), "--output-credential", str(b_cred)))
    b_mi = out(d.cli("identity", "create", "b-mi", cred_path=b_cred))
    seen = {i["objectId"] for i in out(d.cli("identity", "list", cred_path=b_cred))["value"]}
    assert seen == {b_admin["objectId"], b_mi["objectId"]}, seen
    for cmd in (("show",), ("delete",), ("reset-secret",), ("disable",)):
        r = d.cli("identity", *cmd, home_mi["objectId"], cred_path=b_cred, check=False)
        assert r.returncode == 1 and error_of(r)["status"] == 404, (cmd, r.stderr)
        assert error_of(r)["code"] == "IdentityNotFound"
    assert out(d.cli("identity", "show", home_mi["objectId"]))["enabled"] is True  # untouched

    # A non-admin manages nothing, not even itself.
    mi_cred = tmp_path / "mi.credential"
    mi = out(d.cli("identity", "create", "plain", "--output-credential", str(mi_cred)))
    r = d.cli("identity", "list", cred_path=mi_cred, check=False)
    assert r.returncode == 1 and error_of(r)["status"] == 403
    r = d.cli("identity", "show", mi["objectId"], cred_path=mi_cred, check=False)
    assert r.returncode == 1 and error_of(r)["status"] == 403

    r = d.cli("identity", "show", "b-mi", check=False)  # a display name is not an object id
    assert r.returncode == 2 and "is not an object id" in r.stderr, r.stderr
    r = d.cli("policy", "set", "anyvault", "--object-id", "12345", "--key-permissions", "get", check=False)
    assert r.returncode == 2 and "is not an object id" in r.stderr


def test_reset_secret_prints_the_new_secret_once_and_the_old_one_dies(make_daemon, tmp_path):
    d = make_daemon()
    old = tmp_path / "old.credential"
    mi = out(d.cli("identity", "create", "rotating", "--role", "admin", "--output-credential", str(old)))
    assert d.cli("vault", "list", cred_path=old).returncode == 0
    new = tmp_path / "new.credential"
    body = out(d.cli("identity", "reset-secret", mi["objectId"], "--output-credential", str(new)))
    assert body["clientSecret"] and body["clientSecret"] != mi["clientSecret"]
    assert "clientSecret" not in out(d.cli("identity", "show", mi["objectId"]))
    assert json.loads(new.read_text())["client_secret"] == body["clientSecret"]
    r = d.cli("vault", "list", cred_path=old, check=False)
    assert r.returncode == 1 and error_of(r)["status"] == 401
    assert d.cli("vault", "list", cred_path=new).returncode == 0
    out(d.cli("identity", "delete", mi["objectId"]))
    r = d.cli("vault", "list", cred_path=new, check=False)
    assert r.returncode == 1 and error_of(r)["status"] == 401


def test_audit_show_tail_and_since(daemon):
    cli = daemon.cli
    out(cli("vault", "create", "tailvault", "--location", "l", "--subscription", "s"))
    for i in range(3):
        out(cli("key", "create", "tailvault", f"k{i}", "--size", "2048"))
    everything = out(cli("audit", "show", "tailvault"))["value"]
    assert len(everything) >= 4 and all(RFC3339.match(e["time"]) for e in everything)
    # Every read is audited too: the chain grows by one entry per `audit show`.
    tail = out(cli("audit", "show", "tailvault", "--tail", "2"))["value"]
    seqs = [e["seq"] for e in everything]
    assert [e["seq"] for e in tail] == [seqs[-1], seqs[-1] + 1], (tail, seqs)
    since_past = out(cli("audit", "show", "tailvault", "--since", "2000-01-01T00:00:00Z"))["value"]
    assert [e["seq"] for e in since_past][:len(seqs)] == seqs
    assert out(cli("audit", "show", "tailvault", "--since", "2999-01-01T00:00:00Z"))["value"] == []
    since_last = out(cli("audit", "show", "tailvault", "--since", tail[-1]["time"]))["value"]
    assert since_last and since_last[-1]["seq"] > tail[-1]["seq"]  # times are whole seconds
    r = cli("audit", "show", "tailvault", "--tail", "2", "--limit", "5", check=False)
    assert r.returncode == 2 and "not both" in r.stderr
    r = cli("audit", "show", "tailvault", "--since", "yesterday", check=False)
    assert r.returncode == 2 and "RFC 3339" in r.stderr
    # The API says the same to a client that is not the CLI.
    status, body = daemon.http("GET", "/vaults/tailvault/audit?since=yesterday")
    assert status == 400 and "RFC 3339" in body["error"]["message"]
    status, body = daemon.http("GET", "/vaults/tailvault/audit?tail=1")
    assert status == 200 and len(body["value"]) == 1 and body["value"][0]["seq"] > tail[-1]["seq"]
