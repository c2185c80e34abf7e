"""FIPS mode (`serve --fips`, issue 21) with both daemons as real processes and libnbd.

- The seed workflow in FIPS mode: a PMK disk, a CMK disk, key rotation and revocation
  (disable: EIO; enable: the same bytes).
- One on-disk format: a disk written in FIPS mode reads back byte-identical after a
  restart in the default mode, and the other way round.
- The mode is visible: `--version`, /healthz, the metrics and the key service's audit log.
- Refusals: RSA-1024 (generate and import) in words that name FIPS mode; a provider tree
  whose fips.so has one byte changed, or without its module configuration, stops each
  daemon's start with a message that says which, and nothing is served.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import nbd
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from daemonkit.fips import DEFAULT_DIR
from tests.helpers.platform import CliFailed, free_port, pattern, wait_for_eio, wait_for_io
from tests.helpers.servers import ROOT

FIPS = ("--fips",)

pytestmark = pytest.mark.skipif(
    not ((DEFAULT_DIR / "pinned" / "lib/ossl-modules/fips.so").exists()
         and (DEFAULT_DIR / "system" / "lib/ossl-modules/fips.so").exists()),
    reason="no FIPS provider built (scripts/lib/fips.sh)")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _b64u(n: int, length: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(length, "big")).rstrip(b"=").decode()


def test_seed_workflow_in_fips_mode(make_stack):
    stack = make_stack(nbd_args=FIPS, ks_args=FIPS)
    # PMK: the platform's own key, through the FIPS provider on both sides.
    stack.create_disk("pmk1", "--size", "16M")
    h = stack.connect("pmk1")
    data = pattern(1, 256 << 10)
    h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 1 << 20) == data
    h.shutdown()

    # CMK: a customer's RSA-2048 key, rotated, then revoked and given back.
    c = stack.customer_key("cust", "k1", "des1")
    stack.create_disk("cmk1", "--size", "16M", "--des", "des1")
    h = stack.connect("cmk1")
    data = pattern(2, 1 << 20)
    h.pwrite(data, 2 << 20, nbd.CMD_FLAG_FUA)
    new_kid = stack.keyservice("key", "rotate", "cust", "k1")["key"]["kid"]
    stack.nbdserver("des", "update", "des1", "--key-url", stack.key_url("cust", "k1"))
    assert stack.disk("cmk1")["encryption"]["kid"] == new_kid != c["kid"]
    stack.keyservice("key", "disable", "cust", "k1")
    wait_for_eio(h)
    stack.keyservice("key", "enable", "cust", "k1")
    wait_for_io(h)
    assert h.pread(len(data), 2 << 20) == data
    h.shutdown()

    # Visible: health, metrics, the audit log; and nothing outside the provider's list.
    for url in (stack.ks.url + "/healthz", stack.api_url + "/healthz"):
        health = json.loads(_get(url))
        assert health["fips"]["enabled"] is True, health
    nb_health = json.loads(_get(stack.api_url + "/healthz"))["fips"]["providers"]
    assert nb_health["engine"]["name"] == "OpenSSL FIPS Provider", nb_health
    assert set(nb_health) == {"engine", "system", "cryptography"}
    assert 'nbdserver_fips_mode{provider="OpenSSL FIPS Provider",role="engine"' in _get(
        stack.api_url + "/metrics")
    assert "keyservice_fips_mode{" in _get(stack.ks.url + "/metrics")
    status, audit = stack.ks_api("GET", "/audit")  # the service chain: no vault named
    assert status == 200, audit
    starts = [e for e in audit["value"] if e.get("operation") == "StartInFipsMode"]
    assert starts and "FIPS mode: on" in starts[0]["fips"], starts
    assert "FIPS mode: on" in stack.nb.stderr_text() and "FIPS mode: on" in stack.ks.stderr_text()


def test_rsa_1024_refused_naming_fips_mode(make_stack):
    stack = make_stack(ks_args=FIPS)
    stack.keyservice("vault", "create", "fipsv", "--location", "local", "--subscription", "sub1")
    status, body = stack.ks_api("POST", "/vaults/fipsv/keys/small/create", {"kty": "RSA", "key_size": 1024})
    assert status == 400 and "FIPS mode" in json.dumps(body), body
    small = rsa.generate_private_key(65537, 1024).private_numbers()
    jwk = {"kty": "RSA", "n": _b64u(small.public_numbers.n, 128), "e": _b64u(65537, 3),
           "d": _b64u(small.d, 128), "p": _b64u(small.p, 64), "q": _b64u(small.q, 64),
           "dp": _b64u(small.dmp1, 64), "dq": _b64u(small.dmq1, 64), "qi": _b64u(small.iqmp, 64)}
    status, body = stack.ks_api("PUT", "/vaults/fipsv/keys/imported", {"key": jwk})
    assert status == 400 and "FIPS mode" in json.dumps(body), body
    # The approved sizes still work.
    status, body = stack.ks_api("POST", "/vaults/fipsv/keys/ok/create", {"kty": "RSA", "key_size": 3072})
    assert status == 200, body


@pytest.mark.parametrize("first, second", [(FIPS, ()), ((), FIPS)], ids=["fips-then-default",
                                                                          "default-then-fips"])
def test_same_format_in_both_modes(make_stack, first, second):
    stack = make_stack(nbd_args=first, ks_args=first)
    stack.customer_key("cust", "k1", "des1")
    stack.create_disk("cmk1", "--size", "16M", "--des", "des1")
    stack.create_disk("pmk1", "--size", "16M")
    written = {}
    for disk, tag in (("cmk1", 3), ("pmk1", 4)):
        h = stack.connect(disk)
        written[disk] = pattern(tag, 512 << 10) + os.urandom(4096)
        h.pwrite(written[disk], 4096 * 3, nbd.CMD_FLAG_FUA)
        h.shutdown()
    stack.stop_nbdserver()
    stack.stop_keyservice()
    stack.nbd_args, stack.ks_args = list(second), list(second)
    stack.start_keyservice()
    stack.start_nbdserver()
    for disk, data in written.items():
        h = stack.connect(disk)
        assert h.pread(len(data), 4096 * 3) == data, disk
        h.shutdown()


def _copy_trees(tmp_path: Path) -> Path:
    out = tmp_path / "fips"
    out.mkdir()
    for role in ("pinned", "system"):
        src = (DEFAULT_DIR / role).resolve()
        shutil.copytree(src, out / role, ignore=shutil.ignore_patterns("bin", "include", "*.a"))
    return out


def _flip_a_byte(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _serve(args, tmp_path, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _ks_args(tmp_path, fips_dir) -> list[str]:
    return ["-m", "keyservice", "serve", "--data-dir", str(tmp_path / "ks"), "--listen",
            f"127.0.0.1:{free_port()}", "--fips", "--fips-dir", str(fips_dir)]


def _nb_args(tmp_path, fips_dir) -> list[str]:
    return ["-m", "nbdserver.cli", "serve", "--data-dir", str(tmp_path / "nb"),
            "--nbd-listen", f"127.0.0.1:{free_port()}", "--api-listen", f"127.0.0.1:{free_port()}",
            "--keyservice-url", "http://127.0.0.1:1", "--keyservice-credential", str(tmp_path / "none"),
            "--fips", "--fips-dir", str(fips_dir)]


@pytest.mark.parametrize("role", ["system", "pinned"])
def test_tampered_module_stops_start(tmp_path, role):
    fips_dir = _copy_trees(tmp_path)
    _flip_a_byte(fips_dir / role / "lib/ossl-modules/fips.so")
    runs = [_nb_args(tmp_path, fips_dir), _ks_args(tmp_path, fips_dir)]
    for args in runs:
        r = _serve(args, tmp_path)
        assert r.returncode == 1, r
        assert "cannot start in FIPS mode" in r.stderr and "integrity check failed" in r.stderr, r.stderr
        assert "READY" not in r.stdout


@pytest.mark.parametrize("role", ["system", "pinned"])
def test_missing_module_configuration_stops_start(tmp_path, role):
    fips_dir = _copy_trees(tmp_path)
    (fips_dir / role / "ssl/fipsmodule.cnf").unlink()
    r = _serve(_nb_args(tmp_path, fips_dir), tmp_path)
    assert r.returncode == 1, r
    assert "FIPS module configuration missing" in r.stderr and "fipsmodule.cnf" in r.stderr, r.stderr
    (fips_dir / role / "lib/ossl-modules/fips.so").unlink()
    r = _serve(_nb_args(tmp_path, fips_dir), tmp_path)
    assert r.returncode == 1 and "FIPS module missing" in r.stderr, r.stderr


def test_version_says_the_mode(tmp_path):
    env = dict(os.environ, NBDSERVER_FIPS="1", KEYSERVICE_FIPS="0")
    nb = subprocess.run([sys.executable, "-m", "nbdserver.cli", "--version"], capture_output=True,
                        text=True, env=env, check=True).stdout
    assert "FIPS mode: on" in nb and "pinned: OpenSSL FIPS provider" in nb, nb
    ks = subprocess.run([sys.executable, "-m", "keyservice", "--version"], capture_output=True,
                        text=True, env=env, check=True).stdout
    assert "FIPS mode: off" in ks and "system: OpenSSL FIPS provider" in ks, ks


def test_without_fips_nothing_changes(make_stack):
    stack = make_stack()
    assert json.loads(_get(stack.api_url + "/healthz")) == {"status": "ok"}
    assert json.loads(_get(stack.ks.url + "/healthz")) == {"status": "ok"}
    assert 'nbdserver_fips_mode{provider="",role="",version=""} 0.0' in _get(stack.api_url + "/metrics")
    with pytest.raises(CliFailed):
        stack.keyservice("key", "create", "nov", "k", "--size", "1024")
