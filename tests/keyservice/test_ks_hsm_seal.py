"""`serve --seal pkcs11`: the master key sealed by an AES key in a SoftHSM2 token
(keyservice/hsm_seal.py). The data directory alone, backups included, opens nothing."""
import json

from test_ks_api import b64u, unb64u

from tests.helpers.softhsm import make_token


def _args(token):
    return [*token.serve_args(), "--seal", "pkcs11"]


def test_master_key_sealed_in_the_token(make_daemon, tmp_path):
    token = make_token(tmp_path / "hsm")
    data = tmp_path / "data"
    d = make_daemon(data_dir=data, extra_args=_args(token), env=token.env)
    assert not (data / "master-key").exists()
    sealed = data / "master-key.pkcs11"
    assert oct(sealed.stat().st_mode & 0o777) == "0o600"
    blob = json.loads(sealed.read_text())
    assert blob["token"] == token.label and len(bytes.fromhex(blob["ciphertext"])) == 32 + 16
    assert d.http("POST", "/vaults", {"name": "sealed", "location": "l", "subscription": "s"})[0] == 201
    status, w = d.http("POST", "/vaults/sealed/keys/k/create", {"key_size": 2048})
    assert status == 200
    status, w = d.http("POST", "/vaults/sealed/keys/k/wrapkey", {"value": b64u(b"dek" * 8)})
    assert d.stop() == 0

    # The same directory and token: everything is there.
    d = make_daemon(data_dir=data, extra_args=_args(token), env=token.env)
    status, u = d.http("POST", "/vaults/sealed/keys/k/unwrapkey", {"value": w["value"]})
    assert status == 200 and unb64u(u["value"]) == b"dek" * 8
    assert d.stop() == 0

    # Without the token's seal: no file master key to fall back on, the start is refused.
    d = make_daemon(data_dir=data, start=False)
    d.start(expect_ready=False)
    assert d.proc.wait(timeout=30) == 1 and "master key not found" in d.stderr()
    # Another token (its own seal key, no key of that label): refused, with the reason.
    other = make_token(tmp_path / "hsm2")
    d = make_daemon(data_dir=data, extra_args=_args(other), env=other.env, start=False)
    d.start(expect_ready=False)
    assert d.proc.wait(timeout=30) == 1 and "was sealed in PKCS#11 token" in d.stderr()
    # The right token, but its seal key destroyed: refused.
    from pkcs11 import Attribute, ObjectClass
    with token.session(rw=True) as s:
        for obj in s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: "keyservice-seal"}):
            obj.destroy()
    d = make_daemon(data_dir=data, extra_args=_args(token), env=token.env, start=False)
    d.start(expect_ready=False)
    assert d.proc.wait(timeout=30) == 1 and "no longer has the key" in d.stderr()


def test_a_file_sealed_directory_is_not_moved_into_the_hsm(make_daemon, tmp_path):
    token = make_token(tmp_path / "hsm")
    data = tmp_path / "data"
    d = make_daemon(data_dir=data)
    assert d.stop() == 0
    d = make_daemon(data_dir=data, extra_args=_args(token), env=token.env, start=False)
    d.start(expect_ready=False)
    assert d.proc.wait(timeout=30) == 1 and "sealed by a master key file" in d.stderr()
    assert (data / "master-key").exists() and not (data / "master-key.pkcs11").exists()


def test_seal_pkcs11_needs_a_module(make_daemon, tmp_path):
    d = make_daemon(extra_args=["--seal", "pkcs11"], start=False)
    d.start(expect_ready=False)
    assert d.proc.wait(timeout=30) == 2 and "--seal pkcs11 needs --pkcs11-module" in d.stderr()


def test_a_backup_of_an_hsm_sealed_directory_restores_with_the_token(make_daemon, tmp_path):
    """`keyservice backup` of a `--seal pkcs11` directory carries master-key.pkcs11 (useless
    without the token, and the only way back to the master key): restored with the same
    token, the keys unwrap. It was left out, and such a backup could never be restored."""
    import shutil
    token = make_token(tmp_path / "hsm")
    data = tmp_path / "data"
    d = make_daemon(data_dir=data, extra_args=_args(token), env=token.env)
    assert d.http("POST", "/vaults", {"name": "sealedbk", "location": "l", "subscription": "s"})[0] == 201
    assert d.http("POST", "/vaults/sealedbk/keys/k/create", {"key_size": 2048})[0] == 200
    status, w = d.http("POST", "/vaults/sealedbk/keys/k/wrapkey", {"value": b64u(b"dek" * 8)})
    assert status == 200
    r = d.cli("backup", str(tmp_path / "bk"), "--data-dir", str(data))
    manifest = json.loads(r.stdout)
    assert "master-key.pkcs11" in manifest["files"] and "HSM" in manifest["masterKey"], manifest
    assert d.stop() == 0

    restored = tmp_path / "restored"
    shutil.copytree(tmp_path / "bk", restored)
    shutil.copy2(data / "admin.credential", restored / "admin.credential")
    d2 = make_daemon(data_dir=restored, extra_args=_args(token), env=token.env)
    status, u = d2.http("POST", "/vaults/sealedbk/keys/k/unwrapkey", {"value": w["value"]})
    assert status == 200 and unb64u(u["value"]) == b"dek" * 8
    assert d2.stop() == 0
