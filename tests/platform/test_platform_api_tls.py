"""The platform's management API over HTTPS, and no plain HTTP off loopback.

- `serve --api-tls-dir`: the CLI works over https:// with the CA from NBDSERVER_CA or
  `--api-ca`; without it the certificate is refused (a message, not a traceback); a
  plain-HTTP client gets no answer from the TLS listener.
- `serve --api-listen` on a non-loopback address without TLS is a usage error naming the
  options; so are a loose key file and half a certificate pair.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from daemonkit.tlsca import init_ca
from tests.helpers.servers import ROOT


@pytest.fixture(scope="module")
def api_tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("api-tls")
    init_ca(d)
    return d


def test_cli_over_https_with_the_ca(make_stack, api_tls, monkeypatch):
    stack = make_stack(nbd_args=["--api-tls-dir", str(api_tls)])
    stack.nb.api_url = f"https://{stack.nb.api_address}"
    ca = str(api_tls / "ca-cert.pem")

    monkeypatch.setenv("NBDSERVER_CA", ca)
    stack.create_disk("tls1", "--size", "4M")
    assert [d["name"] for d in stack.nbdserver("disk", "list")] == ["tls1"]

    monkeypatch.delenv("NBDSERVER_CA")
    r = stack.nbdserver("disk", "list", check=False)  # the system CAs do not know ours
    # In the words the key service's CLI uses too (daemonkit.httperrors), not OpenSSL's.
    assert r.returncode != 0 and "its TLS certificate is not trusted" in r.stderr, r.stderr
    assert "CERTIFICATE_VERIFY_FAILED" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert [d["name"] for d in stack.nbdserver("--api-ca", ca, "disk", "list")] == ["tls1"]

    plain = urllib.request.Request(f"http://{stack.nb.api_address}/disks")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain, timeout=10).read()


def _serve(tmp_path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "nbdserver.cli", "serve", "--data-dir", str(tmp_path / "nb"),
         "--nbd-listen", "127.0.0.1:0", "--keyservice-url", "http://127.0.0.1:1",
         "--keyservice-credential", str(tmp_path / "none"), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


def test_plain_http_off_loopback_and_bad_tls_files_are_refused(tmp_path, api_tls):
    r = _serve(tmp_path, "--api-listen", "0.0.0.0:0")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "refusing plain HTTP" in r.stderr and "--api-tls-dir" in r.stderr, r.stderr
    r = _serve(tmp_path, "--api-listen", "[::]:0")
    assert r.returncode == 2 and "refusing plain HTTP" in r.stderr, r.stderr
    # A bare host, or a bare port (every address), is checked as what it binds: these
    # were checked as 127.0.0.1 and allowed in plain HTTP.
    for listen in ("0.0.0.0", ":0"):
        r = _serve(tmp_path, "--api-listen", listen)
        assert r.returncode == 2 and "refusing plain HTTP" in r.stderr, (listen, r.stderr)

    r = _serve(tmp_path, "--api-tls-cert", str(api_tls / "server-cert.pem"))
    assert r.returncode == 2 and "go together" in r.stderr, r.stderr
    loose = tmp_path / "loose-key.pem"
    loose.write_bytes((api_tls / "server-key.pem").read_bytes())
    os.chmod(loose, 0o644)
    r = _serve(tmp_path, "--api-tls-cert", str(api_tls / "server-cert.pem"), "--api-tls-key", str(loose))
    assert r.returncode == 2 and "chmod 600" in r.stderr, r.stderr
    assert not (tmp_path / "nb").exists()  # refused before anything was made
