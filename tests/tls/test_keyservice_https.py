"""The key service over HTTPS, and the whole platform with TLS on both of its links.

Real processes: `keyservice serve --tls-dir`, its CLI with KEYSERVICE_CA, and `nbdserver
serve` verifying the key service with --keyservice-ca while serving NBD with TLS required.
"""

from __future__ import annotations

import os
import subprocess
import sys

import nbd
import pytest

from tests.helpers.platform import KeyServiceProcess, Stack, free_port
from tests.helpers.servers import ROOT

pytestmark = pytest.mark.timeout(180)


def https_keyservice(tmp_path, pki, extra=(), files=False) -> KeyServiceProcess:
    tls = (["--tls-cert", str(pki.good / "server-cert.pem"), "--tls-key", str(pki.good / "server-key.pem")]
           if files else ["--tls-dir", str(pki.good)])
    ks = KeyServiceProcess(tmp_path, tmp_path / "ks", free_port(), [*tls, *extra])
    ks.url = f"https://127.0.0.1:{ks.port}"
    return ks


def ks_cli(ks, *args, ca=None, url=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, KEYSERVICE_URL=url or ks.url, KEYSERVICE_CREDENTIAL=str(ks.admin_credential),
               PYTHONPATH=str(ROOT))
    env.pop("KEYSERVICE_CA", None)
    env.pop("NOTIFY_SOCKET", None)
    if ca:
        env["KEYSERVICE_CA"] = str(ca)
    return subprocess.run([sys.executable, "-m", "keyservice", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("files", [False, True], ids=["tls-dir", "tls-cert-and-key"])
def test_cli_verifies_the_service_certificate(tmp_path, pki, files):
    with https_keyservice(tmp_path, pki, files=files) as ks:
        ok = ks_cli(ks, "vault", "create", "vault1", "--location", "local", "--subscription", "s1", ca=pki.good / "ca-cert.pem")
        assert ok.returncode == 0, ok.stderr
        # Not signed by a CA the client trusts: unreachable (exit 3), saying why.
        for ca in (None, pki.rogue / "ca-cert.pem"):
            r = ks_cli(ks, "vault", "list", ca=ca)
            assert r.returncode == 3 and "certificate" in r.stderr.lower(), r.stderr
        # Plain HTTP to the HTTPS port gets no answer it can use.
        r = ks_cli(ks, "vault", "list", url=f"http://127.0.0.1:{ks.port}")
        assert r.returncode != 0
        r = ks_cli(ks, "vault", "list", ca=pki.good / "ca-cert.pem", url=f"http://127.0.0.1:{ks.port}")
        assert r.returncode == 2 and "not https" in r.stderr
        ks.assert_healthy()


def ks_serve(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keyservice", "serve", "--data-dir", str(tmp_path / "d"),
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_plain_http_off_loopback_refused_unless_told(tmp_path, pki):
    r = ks_serve(tmp_path, "--listen", "0.0.0.0:0")
    assert r.returncode == 2 and "refusing plain HTTP" in r.stderr and "Traceback" not in r.stderr
    r = ks_serve(tmp_path, "--tls-dir", str(pki.good), "--tls-cert", str(pki.good / "server-cert.pem"))
    assert r.returncode == 2 and "not both" in r.stderr
    ks = KeyServiceProcess(tmp_path, tmp_path / "ks2", free_port(), ["--insecure-plain-http"])
    ks.argv[ks.argv.index(f"127.0.0.1:{ks.port}")] = f"0.0.0.0:{ks.port}"
    with ks:  # explicitly told: it starts
        ks.assert_healthy()


class TlsStack(Stack):
    """The platform with HTTPS to the key service and NBD TLS required."""

    def __init__(self, workdir, pki):
        ca = pki.good / "ca-cert.pem"
        super().__init__(workdir, ks_args=["--tls-dir", str(pki.good)],
                         nbd_args=["--tls-mode", "required", "--tls-dir", str(pki.good),
                                   "--keyservice-ca", str(ca)])
        self.ks.url = f"https://127.0.0.1:{self.ks.port}"
        self.ca = ca

    @property
    def env(self) -> dict:
        return dict(super().env, KEYSERVICE_CA=str(self.ca))


def test_platform_with_tls_on_both_links(tmp_path, pki):
    with TlsStack(tmp_path, pki) as stack:
        stack.customer_key("cust", "k1", "des1")
        stack.create_disk("d1", "--size", "16M", "--des", "des1")
        host, port = stack.nb.nbd_address.rsplit(":", 1)
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(f"nbd://{host}:{port}/d1")  # plaintext refused
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki.good))
        h.connect_uri(f"nbds://{host}:{port}/d1")
        data = os.urandom(1 << 20)
        h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
        assert h.pread(1 << 20, 0) == data
        h.shutdown()
        stack.assert_healthy()
