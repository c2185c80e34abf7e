"""The master key's rotation, with the daemon as a process (docs/operations.md,
"Rotating the master key").

- `keyservice rotate-master-key` while the service runs: a new current key, the old one
  kept; nothing can be retired until the service has restarted and re-sealed; then the
  old key goes, and after another start every private key still unwraps, audit chains
  made before the rotation verify, and a key backup taken before it restores.
- A database of the release before key ids (0x01 blobs, no sealed service secrets)
  opens: keys unwrap, the audit chain verifies, and everything is re-sealed with ids.
- A private key sealed under a master key the keyring lacks stops the start, by id.
"""
import base64
import json
import os
import sqlite3

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyservice.sealing import derive
from tests.keyservice.test_ks_instances import pair  # noqa: F401  (the fixture, by name)


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def keys(d, *args, check=True):
    r = d.cli("rotate-master-key", "--data-dir", str(d.data_dir), *args, check=check)
    return json.loads(r.stdout) if check else r


def wrapped_key(d, vault: str, name: str) -> dict:
    assert d.http("POST", "/vaults", {"name": vault, "location": "l", "subscription": "s"})[0] == 201
    assert d.http("POST", f"/vaults/{vault}/keys/{name}/create", {"key_size": 2048})[0] == 200
    status, w = d.http("POST", f"/vaults/{vault}/keys/{name}/wrapkey", {"value": b64u(b"dek-" + name.encode())})
    assert status == 200, w
    return w


def unwraps(d, vault: str, name: str, w: dict) -> None:
    status, u = d.http("POST", f"/vaults/{vault}/keys/{name}/unwrapkey", {"value": w["value"]})
    assert status == 200 and u["value"] == b64u(b"dek-" + name.encode()), (status, u)


def test_rotate_restart_retire_and_every_key_still_opens(make_daemon):
    d = make_daemon()
    w1 = wrapped_key(d, "rot1", "k")
    status, backup = d.http("POST", "/vaults/rot1/keys/k/backup")
    assert status == 200, backup
    old = keys(d, "--status")["current"]

    after = keys(d)  # the service keeps running
    new = after["current"]
    assert new != old and [k["id"] for k in after["keys"]] == [new, old]
    assert oct((d.data_dir / "master-key").stat().st_mode & 0o777) == "0o600"
    w2 = wrapped_key(d, "rot2", "k")  # sealed under the key the service started with
    st = keys(d, "--status")
    assert st["keys"][0] == {"id": new, "blobs": 0} and st["retirable"] == []
    r = keys(d, "--retire", check=False)
    assert r.returncode != 0 and "no key can be retired yet" in r.stderr, r.stderr
    assert d.stop() == 0

    d2 = make_daemon(data_dir=d.data_dir)  # re-seals before it listens
    assert "re-sealed" in d2.stderr()
    st = keys(d2, "--status")
    assert st["keys"][1] == {"id": old, "blobs": 0} and st["retirable"] == [old], st
    assert [k["id"] for k in keys(d2, "--retire")["keys"]] == [new]
    assert d2.stop() == 0

    d3 = make_daemon(data_dir=d.data_dir)
    unwraps(d3, "rot1", "k", w1)
    unwraps(d3, "rot2", "k", w2)
    assert "Traceback" not in d3.cli("audit", "verify", "rot1").stdout  # MACs of before the rotation
    assert d3.http("POST", "/vaults", {"name": "rot3", "location": "l", "subscription": "s"})[0] == 201
    status, restored = d3.http("POST", "/vaults/rot3/keys/restore", {"value": backup["value"]})
    assert status == 200, restored
    assert d3.cli("audit", "verify", "rot1").returncode == 0


def test_a_database_of_the_release_before_key_ids_opens(make_daemon):
    d = make_daemon()
    w = wrapped_key(d, "legacy", "k")
    assert d.stop() == 0
    # What that release wrote: 0x01 || nonce || AES-256-GCM under HKDF(master, seal/v1),
    # and no sealed service secrets (they were derived from the master key at each start).
    master = (d.data_dir / "master-key").read_bytes()
    aead = AESGCM(derive(master, "seal/v1"))
    db = sqlite3.connect(d.data_dir / "keyservice.db")
    with db:
        for table, col, where, aad in (("key_versions", "sealed_private", "vault='legacy'", None),
                                       ("meta", "v", "k='master_check'", "meta:master_check")):
            (blob, ident) = db.execute(f"SELECT {col}, {'vault||name||version' if aad is None else 'k'} "
                                       f"FROM {table} WHERE {where}").fetchone()
            row_aad = aad
            if aad is None:
                vault, name, version = db.execute(
                    f"SELECT vault, name, version FROM key_versions WHERE {where}").fetchone()
                row_aad = f"key-version:{vault}/{name}/{version}"
            plain = aead.decrypt(blob[5:17], blob[17:], row_aad.encode())
            nonce = os.urandom(12)
            db.execute(f"UPDATE {table} SET {col}=? WHERE {where}",
                       (b"\x01" + nonce + aead.encrypt(nonce, plain, row_aad.encode()),))
        db.execute("DELETE FROM meta WHERE k IN ('service_secrets', 'sealing_key_id')")
    db.close()

    d2 = make_daemon(data_dir=d.data_dir)
    unwraps(d2, "legacy", "k", w)
    assert d2.cli("audit", "verify", "legacy").returncode == 0  # the same audit key as before
    st = keys(d2, "--status")
    assert st["legacyBlobs"] == 0 and st["blockedBy"] == [], st


def test_a_key_sealed_under_a_master_key_outside_the_keyring_stops_the_start(make_daemon, tmp_path):
    d = make_daemon()
    wrapped_key(d, "gone", "k")
    assert d.stop() == 0
    original = (d.data_dir / "master-key").read_bytes()
    stranger = os.urandom(32)
    # The keyring: a stranger first, the key of everything else after it; the version
    # alone is under a third key that is in neither.
    third = os.urandom(32)
    from daemonkit.keyring import Keyring
    from keyservice.sealing import Seal
    db = sqlite3.connect(d.data_dir / "keyservice.db")
    with db:
        vault, name, version = db.execute("SELECT vault, name, version FROM key_versions").fetchone()
        db.execute("UPDATE key_versions SET sealed_private=?",
                   (Seal(Keyring((third,))).seal(b"x", f"key-version:{vault}/{name}/{version}"),))
    db.close()
    (d.data_dir / "master-key").write_text(f"{stranger.hex()}\n{original.hex()}\n")
    d2 = make_daemon(data_dir=d.data_dir, start=False)
    d2.start(expect_ready=False)
    assert d2.proc.wait(timeout=60) == 1
    from daemonkit.keyring import key_id
    err = d2.stderr()
    assert f"master key {key_id(third).hex()}, which is not in the keyring" in err, err
    assert "Traceback" not in err


def test_a_keyring_sealed_in_the_hsm_rotates_too(make_daemon, tmp_path):
    import subprocess
    import sys

    from tests.helpers.softhsm import make_token
    token = make_token(tmp_path / "hsm")
    args = [*token.serve_args(), "--seal", "pkcs11"]
    data = tmp_path / "data"
    d = make_daemon(data_dir=data, extra_args=args, env=token.env)
    w = wrapped_key(d, "hsmrot", "k")

    def hsm_keys(*extra):
        r = subprocess.run([sys.executable, "-m", "keyservice", "rotate-master-key", "--data-dir",
                            str(data), *token.serve_args(), *extra], capture_output=True, text=True,
                           env=dict(os.environ, **token.env), timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    r = keys(d, "--status", check=False)  # without the token: refused, saying what it needs
    assert r.returncode != 0 and "--pkcs11-module" in r.stderr, r.stderr
    old = hsm_keys("--status")["current"]
    new = hsm_keys()["current"]
    sealed = json.loads((data / "master-key.pkcs11").read_text())
    assert len(sealed["keys"]) == 2 and not (data / "master-key").exists()
    assert oct((data / "master-key.pkcs11").stat().st_mode & 0o777) == "0o600"
    assert d.stop() == 0
    d2 = make_daemon(data_dir=data, extra_args=args, env=token.env)
    assert hsm_keys("--retire")["keys"] == [{"id": new, "blobs": hsm_keys("--status")["keys"][0]["blobs"]}]
    assert new != old and len(json.loads((data / "master-key.pkcs11").read_text())["keys"]) == 1
    assert d2.stop() == 0
    d3 = make_daemon(data_dir=data, extra_args=args, env=token.env)
    unwraps(d3, "hsmrot", "k", w)


def test_an_instance_not_yet_restarted_opens_what_another_resealed(request, make_daemon):
    """Two instances on one PostgreSQL database, a rolling rotation: the new keyring is
    installed on both, A restarts and re-seals every key under the new master key; B,
    still running on the keyring it started with, reads its keyring file again when a
    blob names the new key, and keeps answering."""
    import shutil
    a, b = request.getfixturevalue("pair")  # test_ks_instances.py's: A and B on one database
    assert a.http("POST", "/vaults", {"name": "rolling", "location": "l", "subscription": "s"})[0] == 201
    assert a.http("POST", "/vaults/rolling/keys/k/create", {"key_size": 2048})[0] == 200
    status, w = a.http("POST", "/vaults/rolling/keys/k/wrapkey", {"value": b64u(b"dek-k")})
    assert status == 200, w  # a public-key operation: no instance has unsealed the key yet
    state = a.extra_args[a.extra_args.index("--state") + 1]
    new = keys(a, "--state", state)["current"]
    shutil.copy2(a.data_dir / "master-key", b.data_dir / "master-key")
    assert a.stop() == 0
    a2 = make_daemon(data_dir=a.data_dir, extra_args=a.extra_args)
    assert "re-sealed" in a2.stderr()
    unwraps(b, "rolling", "k", w)  # B's first unseal of this key: under the new master key
    st = keys(a2, "--state", state, "--status")
    assert st["current"] == new and st["keys"][1]["blobs"] == 0, st
