"""The daemon as a process: first start, master key, restart, shutdown,
secrets at rest and in logs, audit tampering."""
import base64
import os
import sqlite3
import stat
import subprocess
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyservice.client import Credential


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def test_first_start_writes_0600_credential_and_master_key(make_daemon):
    d = make_daemon()
    for name in ("admin.credential", "master-key", "keyservice.db"):
        mode = stat.S_IMODE((d.data_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    cred = d.admin
    assert cred.client_secret and cred.object_id and cred.tenant_id
    assert d.http("GET", "/vaults")[0] == 200


def test_missing_or_wrong_master_key_refuses_to_start(make_daemon, tmp_path):
    d = make_daemon()
    assert d.stop() == 0
    (d.data_dir / "master-key").rename(tmp_path / "kept-master-key")
    r = subprocess.run([sys.executable, "-m", "keyservice", "serve", "--data-dir", str(d.data_dir),
                        "--listen", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "cannot start: master key not found" in r.stderr and "--master-key-file" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "wrong").write_bytes(os.urandom(32))
    r = subprocess.run([sys.executable, "-m", "keyservice", "serve", "--data-dir", str(d.data_dir),
                        "--listen", "127.0.0.1:1", "--master-key-file", str(tmp_path / "wrong")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "does not match this database" in r.stderr
    # systemd credentials: $CREDENTIALS_DIRECTORY/master-key
    creds = tmp_path / "creds"
    creds.mkdir()
    (tmp_path / "kept-master-key").rename(creds / "master-key")
    d2 = make_daemon(data_dir=d.data_dir, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert d2.http("GET", "/vaults")[0] == 200


def test_restart_keeps_everything_and_sigterm_is_clean(make_daemon):
    d = make_daemon()
    d.http("POST", "/vaults", {"name": "persist", "location": "l", "subscription": "s"})
    status, key = d.http("POST", "/vaults/persist/keys/k/create", {"key_size": 2048})
    status, w = d.http("POST", "/vaults/persist/keys/k/wrapkey", {"value": b64u(b"dek")})
    assert d.stop() == 0
    assert d.wait_notify("STOPPING=1", deadline=1)
    assert "stopped" in d.stderr()
    d2 = make_daemon(data_dir=d.data_dir)
    assert d2.admin == d.admin  # not re-bootstrapped
    status, u = d2.http("POST", "/vaults/persist/keys/k/unwrapkey", {"value": w["value"]})
    assert status == 200 and u["value"] == b64u(b"dek")


def test_database_alone_reveals_no_key_and_logs_hold_no_secret(make_daemon):
    d = make_daemon()
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    d.http("POST", "/vaults", {"name": "secrets", "location": "l", "subscription": "s"})
    assert d.http("PUT", "/vaults/secrets/keys/imp", {"pem": pem.decode()})[0] == 200
    status, created = d.http("POST", "/vaults/secrets/keys/gen/create", {"key_size": 2048})
    mi = d.identity("mi")
    status, w = d.http("POST", "/vaults/secrets/keys/imp/wrapkey", {"value": b64u(b"S3CRET-DEK-" * 4)})
    d.http("POST", "/vaults/secrets/keys/imp/unwrapkey", {"value": w["value"]})
    assert d.stop() == 0
    # every file the database consists of, WAL included
    blob = b"".join(p.read_bytes() for p in d.data_dir.glob("keyservice.db*"))
    d_bytes = private.private_numbers().d.to_bytes(256, "big")
    p_bytes = private.private_numbers().p.to_bytes(128, "big")
    for needle in (der, pem, d_bytes, p_bytes, b"PRIVATE KEY", b"S3CRET-DEK",
                   d.admin.client_secret.encode(), mi.client_secret.encode()):
        assert needle not in blob
    log = d.stderr()
    for needle in (d.admin.client_secret, mi.client_secret, "PRIVATE KEY", b64u(b"S3CRET-DEK-" * 4),
                   w["value"], d.token(d.admin), b64u(d_bytes)):
        assert needle not in log
    assert "wrapkey 200" in log  # the log does record the call itself


def test_audit_verify_detects_edit_and_removal(make_daemon):
    d = make_daemon()
    d.http("POST", "/vaults", {"name": "audited", "location": "l", "subscription": "s"})
    d.http("POST", "/vaults/audited/keys/k/create", {"key_size": 2048})
    for _ in range(3):
        d.http("GET", "/vaults/audited/keys/k")
    r = d.cli("audit", "verify", "audited")
    assert '"valid": true' in r.stdout
    status, entries = d.http("GET", "/vaults/audited/audit")
    ops = [e["operation"] for e in entries["value"]]
    assert ops[:2] == ["VaultCreate", "KeyCreate"] and "KeyGet" in ops
    assert all(e["caller"] == d.admin.object_id for e in entries["value"])
    db = sqlite3.connect(d.data_dir / "keyservice.db")
    # edit: rewrite one entry's caller
    (entry,) = db.execute("SELECT entry FROM audit WHERE chain=(SELECT audit_chain FROM vaults WHERE name='audited') AND seq=2").fetchone()
    db.execute("UPDATE audit SET entry=? WHERE chain=(SELECT audit_chain FROM vaults WHERE name='audited') AND seq=2",
               (entry.replace(d.admin.object_id, "00000000-0000-0000-0000-000000000000"),))
    db.commit()
    r = d.cli("audit", "verify", "audited", check=False)
    assert r.returncode == 1 and '"firstBadSeq": 2' in r.stdout and "modified" in r.stdout
    db.execute("UPDATE audit SET entry=? WHERE chain=(SELECT audit_chain FROM vaults WHERE name='audited') AND seq=2", (entry,))
    db.commit()
    assert d.cli("audit", "verify", "audited").returncode == 0
    # removal in the middle
    row = db.execute("SELECT * FROM audit WHERE chain=(SELECT audit_chain FROM vaults WHERE name='audited') AND seq=3").fetchone()
    db.execute("DELETE FROM audit WHERE chain=(SELECT audit_chain FROM vaults WHERE name='audited') AND seq=3")
    db.commit()
    r = d.cli("audit", "verify", "audited", check=False)
    assert r.returncode == 1 and "entry 3 is missing" in r.stdout
    db.execute("INSERT INTO audit VALUES (?,?,?,?,?)", row)
    db.commit()
    # removal of the newest entries (the head row catches it)
    last = db.execute("SELECT MAX(seq) FROM audit WHERE chain=(SELECT audit_chain FROM vaults WHERE name='audited')").fetchone()[0]
    db.execute("DELETE FROM audit WHERE chain=(SELECT audit_chain FROM vaults WHERE name='audited') AND seq=?", (last,))
    db.commit()
    db.close()
    r = d.cli("audit", "verify", "audited", check=False)
    assert r.returncode == 1 and "head records" in r.stdout


def test_sd_notify_ready_only_after_listening(make_daemon):
    d = make_daemon(start=False)
    d.start(expect_ready=False)
    assert d.wait_notify("READY=1")
    # READY was sent: the socket accepts right now, without any retry
    import socket
    with socket.create_connection(("127.0.0.1", d.port), timeout=5):
        pass


def test_credential_dump_is_0600(tmp_path):
    c = Credential("a", "b", "c", "d")
    c.dump(tmp_path / "cred")
    assert stat.S_IMODE((tmp_path / "cred").stat().st_mode) == 0o600
    assert Credential.load(tmp_path / "cred") == c


def test_sigterm_ends_open_change_streams_and_exits_cleanly(make_daemon):
    import asyncio

    import pytest

    from keyservice.client import KeyServiceClient, KeyServiceUnavailable
    d = make_daemon()

    async def flow():
        async with KeyServiceClient(d.url, d.admin) as c:
            await c.create_vault("closing", location="l", subscription="s")
            await c.create_key("closing", "k", size=2048)  # so there is an event to wait for
            stream = c.events(since=0)
            await stream.__anext__()  # the stream is open and delivering
            d.proc.terminate()
            with pytest.raises(KeyServiceUnavailable):
                async for _ in stream:
                    pass
    asyncio.run(asyncio.wait_for(flow(), 30))
    assert d.proc.wait(timeout=15) == 0
    assert "Traceback" not in d.stderr()


def test_port_in_use_is_a_clear_error(make_daemon):
    d = make_daemon()
    r = subprocess.run([sys.executable, "-m", "keyservice", "serve", "--data-dir", str(d.data_dir) + "-2",
                        "--listen", f"127.0.0.1:{d.port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot listen on" in r.stderr and "Traceback" not in r.stderr
