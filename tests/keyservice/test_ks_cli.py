"""The command line, driven as a subprocess against the real daemon."""
import base64
import json
import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def out(r):
    return json.loads(r.stdout)


def test_cli_walkthrough(daemon, tmp_path):
    cli = daemon.cli
    cred_file = tmp_path / "des.credential"
    mi = out(cli("identity", "create", "des-cli", "--output-credential", str(cred_file)))
    assert mi["type"] == "managedIdentity" and mi["clientSecret"]
    assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
    v = out(cli("vault", "create", "clivault", "--location", "westeurope", "--subscription", "s",
                "--retention-days", "7", "--enable-purge-protection"))
    assert v["softDeleteRetentionInDays"] == 7 and v["enablePurgeProtection"] is True
    assert out(cli("vault", "show", "clivault"))["name"] == "clivault"
    assert "clivault" in [x["name"] for x in out(cli("vault", "list"))["value"]]
    k = out(cli("key", "create", "clivault", "k1", "--size", "2048"))
    version1 = k["key"]["kid"].rsplit("/", 1)[1]
    pem = tmp_path / "k.pem"
    pem.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    out(cli("key", "import", "clivault", "k2", "--pem", str(pem)))
    assert len(out(cli("key", "list", "clivault"))["value"]) == 2
    out(cli("key", "rotate", "clivault", "k1"))
    assert len(out(cli("key", "versions", "clivault", "k1"))["value"]) == 2
    assert out(cli("key", "show", "clivault", "k1", "--version", version1))["key"]["kid"] == k["key"]["kid"]
    out(cli("policy", "set", "clivault", "--object-id", mi["objectId"], "--key-permissions",
            "get,wrapKey,unwrapKey"))
    value = base64.urlsafe_b64encode(b"disk-key").rstrip(b"=").decode()
    w = out(cli("key", "wrap", "clivault", "k1", "--value", value, cred_path=cred_file))
    u = out(cli("key", "unwrap", "clivault", "k1", "--version", w["kid"].rsplit("/", 1)[1],
                "--value", w["value"], cred_path=cred_file))
    assert u["value"] == value
    out(cli("key", "disable", "clivault", "k1"))
    r = cli("key", "wrap", "clivault", "k1", "--value", value, cred_path=cred_file, check=False)
    assert r.returncode == 1 and json.loads(r.stderr.splitlines()[-1])["error"]["code"] == "Forbidden"
    out(cli("key", "enable", "clivault", "k1"))
    out(cli("key", "wrap", "clivault", "k1", "--value", value, cred_path=cred_file))
    out(cli("policy", "delete", "clivault", "--object-id", mi["objectId"]))
    r = cli("key", "wrap", "clivault", "k1", "--value", value, cred_path=cred_file, check=False)
    assert r.returncode == 1 and "wrapKey permission" in r.stderr
    out(cli("key", "delete", "clivault", "k2"))
    assert out(cli("key", "list", "clivault", "--deleted"))["value"][0]["kid"].endswith("/k2")
    r = cli("key", "purge", "clivault", "k2", check=False)  # purge protection
    assert r.returncode == 1 and "purge protection" in r.stderr
    out(cli("key", "recover", "clivault", "k2"))
    out(cli("vault", "delete", "clivault"))
    assert out(cli("vault", "show", "clivault", "--deleted"))["state"] == "softDeleted"
    r = cli("vault", "purge", "clivault", check=False)
    assert r.returncode == 1 and json.loads(r.stderr.splitlines()[-1])["error"]["status"] == 403
    out(cli("vault", "recover", "clivault"))
    entries = out(cli("audit", "show", "clivault"))["value"]
    assert {"KeyWrap", "KeyUnwrapVersion", "PolicySet", "VaultRecover"} <= {e["operation"] for e in entries}
    assert out(cli("audit", "verify", "clivault"))["valid"] is True


def test_cli_plain_vault_purge_and_errors(daemon):
    cli = daemon.cli
    out(cli("vault", "create", "cliplain", "--location", "l", "--subscription", "s"))
    out(cli("key", "create", "cliplain", "k", "--size", "2048"))
    out(cli("key", "delete", "cliplain", "k"))
    out(cli("key", "purge", "cliplain", "k"))
    r = cli("vault", "create", "cliplain2", "--location", "l", "--subscription", "s",
            "--retention-days", "3", check=False)
    assert r.returncode == 1 and "between 7 and 90" in r.stderr
    out(cli("vault", "delete", "cliplain"))
    out(cli("vault", "purge", "cliplain"))
    r = cli("vault", "show", "cliplain", check=False)
    assert r.returncode == 1 and json.loads(r.stderr.splitlines()[-1])["error"]["code"] == "VaultNotFound"


def test_cli_without_environment_or_service(daemon, tmp_path):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSERVICE_")}
    r = subprocess.run([sys.executable, "-m", "keyservice", "vault", "list"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "KEYSERVICE_URL" in r.stderr
    env.update(KEYSERVICE_URL="http://127.0.0.1:1", KEYSERVICE_CREDENTIAL=str(daemon.data_dir / "admin.credential"))
    r = subprocess.run([sys.executable, "-m", "keyservice", "vault", "list"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "unreachable" in r.stderr and "Traceback" not in r.stderr
