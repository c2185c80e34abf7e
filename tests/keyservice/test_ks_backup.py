"""The key service's database over the years: online backup and restore, schema versions.

- `keyservice backup` while keys are being created: the restored service (another data
  directory, the master key supplied apart) unwraps what was wrapped before the backup
  and its audit chains verify; without the master key it refuses to start, saying why.
- A database of the previous release (its schema, the fixture, user_version 0) is
  migrated at start and keeps working; a newer release's is refused with a message; a
  data directory that lost its database is refused instead of starting empty.
"""
import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _vault_and_wrapped(d, vault: str) -> tuple[str, str]:
    assert d.http("POST", "/vaults", {"name": vault, "location": "l", "subscription": "s"})[0] == 201
    status, key = d.http("POST", f"/vaults/{vault}/keys/k/create", {"key_size": 2048})
    assert status == 200, key
    version = key["key"]["kid"].rsplit("/", 1)[1]
    status, w = d.http("POST", f"/vaults/{vault}/keys/k/{version}/wrapkey",
                       {"alg": "RSA-OAEP-256", "value": b64u(b"D" * 64)})
    assert status == 200, w
    return version, w["value"]


def _unwraps(d, vault: str, version: str, wrapped: str) -> None:
    status, out = d.http("POST", f"/vaults/{vault}/keys/k/{version}/unwrapkey",
                         {"alg": "RSA-OAEP-256", "value": wrapped})
    assert status == 200 and out["value"] == b64u(b"D" * 64), out


def _refused_start(data_dir: Path, *extra) -> str:
    r = subprocess.run([sys.executable, "-m", "keyservice", "serve", "--data-dir", str(data_dir),
                        "--listen", "127.0.0.1:1", *extra], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return r.stderr


def test_online_backup_restores_elsewhere_with_the_master_key_supplied(make_daemon, tmp_path):
    d = make_daemon()
    version, wrapped = _vault_and_wrapped(d, "backedup")
    stop, made = threading.Event(), []

    def churn():  # the service keeps changing while the backup runs
        while not stop.is_set():
            status, _ = d.http("POST", f"/vaults/backedup/keys/c{len(made)}/create", {"key_size": 2048})
            assert status == 200
            made.append(status)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        r = d.cli("backup", str(tmp_path / "bk"), "--data-dir", str(d.data_dir))
    finally:
        stop.set()
        t.join(timeout=60)
    manifest = json.loads(r.stdout)
    assert manifest["schemaVersion"] == 1 and "not included" in manifest["masterKey"]
    assert sorted(manifest["files"]) == ["keyservice.db"]
    assert d.stop() == 0

    restored = tmp_path / "restored"
    shutil.copytree(tmp_path / "bk", restored)
    assert "master key not found" in _refused_start(restored)  # nothing opens without it
    shutil.copy2(d.data_dir / "master-key", restored / "master-key")
    shutil.copy2(d.data_dir / "admin.credential", restored / "admin.credential")
    d2 = make_daemon(data_dir=restored)
    _unwraps(d2, "backedup", version, wrapped)
    assert d2.cli("audit", "verify", "backedup").returncode == 0
    status, keys = d2.http("GET", "/vaults/backedup/keys")
    assert status == 200 and len(keys["value"]) >= 1


def _as_previous_release(db_path: Path) -> None:
    """Rebuild the database with the previous release's schema (the fixture), its rows
    kept, user_version 0: what that release left on disk."""
    schema = sqlite3.connect(":memory:")
    schema.executescript((FIXTURES / "keyservice_schema_v0.sql").read_text())
    columns = {t: [c[1] for c in schema.execute(f"PRAGMA table_info({t})")]
               for (t,) in schema.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                          "AND name NOT LIKE 'sqlite_%'")}
    schema.close()
    src = sqlite3.connect(db_path)  # what this release wrote, as that release's columns
    rows = {t: src.execute(f"SELECT {', '.join(cs)} FROM {t}").fetchall() for t, cs in columns.items()}
    src.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    old = sqlite3.connect(db_path)
    old.executescript((FIXTURES / "keyservice_schema_v0.sql").read_text())
    for t, rs in rows.items():
        for r in rs:
            old.execute(f"INSERT INTO {t} ({', '.join(columns[t])}) VALUES "
                        f"({','.join('?' * len(r))})", r)
    old.commit()
    assert old.execute("PRAGMA user_version").fetchone()[0] == 0
    old.close()


def test_previous_release_database_is_migrated(make_daemon):
    d = make_daemon()
    version, wrapped = _vault_and_wrapped(d, "oldrelease")
    assert d.stop() == 0
    _as_previous_release(d.data_dir / "keyservice.db")
    d2 = make_daemon(data_dir=d.data_dir)
    _unwraps(d2, "oldrelease", version, wrapped)
    assert d2.cli("audit", "verify", "oldrelease").returncode == 0
    assert d2.stop() == 0
    db = sqlite3.connect(d.data_dir / "keyservice.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()


def test_newer_schema_or_lost_database_is_refused_with_a_message(make_daemon):
    d = make_daemon()
    assert d.stop() == 0
    db = sqlite3.connect(d.data_dir / "keyservice.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    assert "newer release" in _refused_start(d.data_dir)
    for suffix in ("", "-wal", "-shm"):
        Path(str(d.data_dir / "keyservice.db") + suffix).unlink(missing_ok=True)
    err = _refused_start(d.data_dir)
    assert "keyservice.db is missing" in err and "restore" in err, err
    assert not (d.data_dir / "keyservice.db").exists()  # nothing made in its place
    (d.data_dir / "keyservice.db").write_bytes(os.urandom(8192))
    assert "not a database" in _refused_start(d.data_dir)
