"""In FIPS mode every secret the daemons make outside a libcrypto call comes from the FIPS
provider's DRBG (`daemonkit.fips.random_bytes`, Python's `ssl.RAND_bytes` over the system
libcrypto the FIPS configuration loads), never from the kernel. The DRBG is replaced here by
a recorder only to see who asks it; tests/fips/ runs the real provider."""

import ssl

import pytest

from daemonkit import fips
from daemonkit.keyring import Keyring
from daemonkit.sealer import Sealer


@pytest.fixture
def drbg(monkeypatch):
    asked: list[int] = []

    def rand(n: int) -> bytes:
        asked.append(n)
        return bytes(range(n))  # recognisable, so its use is visible in the output

    monkeypatch.setattr(fips.STATUS, "enabled", True)
    monkeypatch.setattr(ssl, "RAND_bytes", rand)
    return asked


def test_seal_nonces_come_from_the_fips_drbg(drbg):
    sealer = Sealer(Keyring((b"\x11" * 32,)))
    blob = sealer.seal(b"secret", "row")
    assert drbg == [12]
    assert bytes(range(12)) in blob
    assert sealer.open(blob, "row") == b"secret"


def test_new_master_keys_come_from_the_fips_drbg(drbg):
    rotated = Keyring((b"\x11" * 32,)).rotated()
    assert drbg == [32] and rotated.keys[0] == bytes(range(32))


def test_nbd_psk_and_api_token_come_from_the_fips_drbg(drbg, tmp_path):
    from nbdserver.api import load_api_token
    from nbdserver.tls import write_psk_file
    write_psk_file(tmp_path / "psk", "client")
    token = load_api_token(str(tmp_path))
    assert drbg == [32, 32] and token


def test_without_fips_the_kernel_gives_them(monkeypatch):
    monkeypatch.setattr(fips.STATUS, "enabled", False)
    monkeypatch.setattr(ssl, "RAND_bytes", lambda n: pytest.fail("DRBG asked outside FIPS mode"))
    Sealer(Keyring((b"\x11" * 32,))).seal(b"x", "row")
