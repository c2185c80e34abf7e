"""The engine's FIPS mode (`_xts.enable_fips`, nbdserver/fipsmode.py), each case in a fresh
interpreter: the mode is process-wide and set once.

- Same ciphertext: a sector encrypted in the FIPS provider equals the default provider's
  (IEEE 1619 is one function), and random bytes come from the provider's DRBG.
- Refusals: a second enable, an enable after the first Engine, a tampered fips.so (the
  integrity check is named), a configuration without the provider's section.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemonkit.fips import DEFAULT_DIR, tree
from tests.helpers.servers import ROOT

PINNED = DEFAULT_DIR / "pinned"
pytestmark = pytest.mark.skipif(not (PINNED / "lib/ossl-modules/fips.so").exists(),
                                reason="no FIPS provider built (scripts/lib/openssl.sh)")

PRELUDE = """
import sys
from nbdserver.crypto import _xts
config, modules = sys.argv[1], sys.argv[2]
key = bytes(range(64))
plain = bytes(range(256)) * 16
"""


def _run(code: str, provider_root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    provider = tree(provider_root.parent, provider_root.name)
    config = provider.write_config(tmp_path / "conf", "engine.cnf")
    return subprocess.run([sys.executable, "-c", PRELUDE + code, str(config), str(provider.modules)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_fips_ciphertext_equals_default_and_drbg_works(tmp_path):
    code = """
def sector(engine):
    out = bytearray(4096)
    engine.encrypt(plain, out, 7)
    return bytes(out)
name, version, _ = _xts.enable_fips(config, modules)
fips = sector(_xts.Engine(key, 4096))
buf = bytearray(64)
_xts.random_into(buf)
print(name, version, fips.hex(), buf != bytearray(64), sep=chr(10))
"""
    r = _run(code, PINNED, tmp_path)
    assert r.returncode == 0, r.stderr
    name, version, fips_hex, drbg = r.stdout.splitlines()
    assert name == "OpenSSL FIPS Provider" and version == (PINNED / "VERSION").read_text().strip()
    from nbdserver.crypto import _xts
    default = bytearray(4096)
    _xts.Engine(bytes(range(64)), 4096).encrypt(bytes(range(256)) * 16, default, 7)
    assert bytes.fromhex(fips_hex) == bytes(default)
    assert drbg == "True"


def test_enable_refused_twice_and_after_an_engine(tmp_path):
    code = """
_xts.Engine(key, 4096)
try:
    _xts.enable_fips(config, modules)
except RuntimeError as e:
    print("refused:", e)
"""
    r = _run(code, PINNED, tmp_path)
    assert "refused: FIPS mode must be on before the first Engine" in r.stdout, r
    code = """
_xts.enable_fips(config, modules)
try:
    _xts.enable_fips(config, modules)
except RuntimeError as e:
    print("refused:", e)
"""
    r = _run(code, PINNED, tmp_path)
    assert "refused: FIPS mode is already on" in r.stdout, r


def test_tampered_module_names_the_integrity_check(tmp_path):
    copy = tmp_path / "pinned"
    shutil.copytree(PINNED.resolve(), copy, ignore=shutil.ignore_patterns("bin", "include", "*.a"))
    module = copy / "lib/ossl-modules/fips.so"
    module.chmod(0o644)
    data = bytearray(module.read_bytes())
    data[len(data) // 2] ^= 0x01
    module.write_bytes(bytes(data))
    code = """
try:
    _xts.enable_fips(config, modules)
except RuntimeError as e:
    print("refused:", e)
else:
    print("loaded")
e = _xts.Engine(key, 4096)  # the default provider still works: the refusal changed nothing
"""
    r = _run(code, copy, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "refused: integrity check failed: Module_Integrity" in r.stdout, r.stdout
