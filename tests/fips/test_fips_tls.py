"""TLS in FIPS mode: HTTPS to the key service and NBD TLS required, both daemons with
`--fips`, a real libnbd client; and a client that offers only ChaCha20-Poly1305 (in no
FIPS provider) is refused by the key service's HTTPS, where the default mode accepts it."""

from __future__ import annotations

import os
import subprocess

import nbd
import pytest

from tests.tls.test_keyservice_https import TlsStack

pytestmark = pytest.mark.timeout(240)


def _chacha_only(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                           "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"],
                          input="", capture_output=True, text=True, timeout=30)


def test_tls_on_both_links_in_fips_mode(tmp_path, pki):
    stack = TlsStack(tmp_path, pki)
    stack.ks.argv.append("--fips")
    stack.nbd_args.append("--fips")
    with stack:
        stack.customer_key("cust", "k1", "des1")
        stack.create_disk("d1", "--size", "16M", "--des", "des1")
        host, port = stack.nb.nbd_address.rsplit(":", 1)
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki.good))
        h.connect_uri(f"nbds://{host}:{port}/d1")
        data = os.urandom(1 << 20)
        h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
        assert h.pread(1 << 20, 0) == data
        h.shutdown()
        r = _chacha_only(stack.ks.port)
        assert "TLS_CHACHA20_POLY1305_SHA256" not in r.stdout.split("Cipher is", 1)[-1][:60], r.stdout
        assert "FIPS mode: on" in stack.ks.stderr_text()
        stack.assert_healthy()


def test_chacha_accepted_without_fips(tmp_path, pki):
    """The control: the same client gets ChaCha20-Poly1305 from a default-mode service."""
    with TlsStack(tmp_path, pki) as stack:
        r = _chacha_only(stack.ks.port)
        assert "Cipher is TLS_CHACHA20_POLY1305_SHA256" in r.stdout, r.stdout + r.stderr
