"""nbdserver/tls.py: the default mode, refusals of settings that cannot work;
and the daemons' command lines refusing what the issue says a deployment must not forget."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys

import nbd
import pytest

from nbdserver.protocol.handshake import TlsMode
from nbdserver.tls import (
    ServerTls,
    TlsConfigError,
    _libssl,
    _ssl_ctx_pointer,
    default_mode,
    load_psk_file,
    server_context_for,
)
from tests.helpers.servers import ROOT, BaselineServer

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("host,mode", [("127.0.0.1", TlsMode.OFF), ("::1", TlsMode.OFF),
                                       ("localhost", TlsMode.OFF), ("0.0.0.0", TlsMode.REQUIRED),
                                       ("", TlsMode.REQUIRED), ("10.0.0.5", TlsMode.REQUIRED),
                                       ("nbd.example", TlsMode.REQUIRED)])
def test_default_mode(host, mode):
    assert default_mode(host) is mode


def test_refused_settings(pki, tmp_path):
    with pytest.raises(TlsConfigError, match="required by default"):
        server_context_for(TlsMode.REQUIRED, ServerTls())
    with pytest.raises(TlsConfigError, match="--tls-mode off"):
        server_context_for(TlsMode.OFF, ServerTls(cert_dir=str(pki.good)))
    with pytest.raises(TlsConfigError, match="needs --tls-dir"):
        ServerTls(verify_clients=True, psk_file=str(pki.good / "keys.psk")).context()
    loose = tmp_path / "loose"
    shutil.copytree(pki.good, loose)
    (loose / "server-key.pem").chmod(0o644)
    with pytest.raises(TlsConfigError, match="readable or writable by others"):
        ServerTls(cert_dir=str(loose)).context()
    with pytest.raises(TlsConfigError, match="missing|no such file"):
        ServerTls(cert_dir=str(tmp_path / "nowhere")).context()


@pytest.mark.parametrize("text,error", [("alice:00ff", "16..256 bytes"), ("no-colon", "identity:hexkey"),
                                        ("alice:zz" + "00" * 16, "16..256 bytes"), ("# only\n", "no keys")])
def test_bad_psk_files(tmp_path, text, error):
    f = tmp_path / "k.psk"
    f.write_text(text + "\n")
    f.chmod(0o600)
    with pytest.raises(TlsConfigError, match=error):
        load_psk_file(f)


def test_psk_identities_and_ssl_ctx_pointer(pki):
    keys = load_psk_file(pki.good / "keys.psk")
    assert list(keys) == ["alice"] and len(keys["alice"]) == 32
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lib = _libssl()
    ptr = _ssl_ctx_pointer(lib, ctx)
    ctx.options |= ssl.OP_NO_TICKET  # a change through Python shows through that pointer
    assert lib.SSL_CTX_get_options(ptr) == int(ctx.options)


def baseline(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbdserver.baseline", *args, "d=/dev/null,size=1M"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_baseline_off_loopback_needs_tls():
    r = baseline("--listen", "0.0.0.0:0")
    assert r.returncode == 2 and "required by default" in r.stderr and "Traceback" not in r.stderr


def test_baseline_off_loopback_defaults_to_required(tmp_path, pki):
    srv = BaselineServer(tmp_path, [f"disk={tmp_path / 'd.img'},size=1M"],
                         extra_args=["--tls-dir", str(pki.good)])  # no --tls-mode
    srv.argv[srv.argv.index("127.0.0.1:0")] = "0.0.0.0:0"  # a wildcard, reached on loopback
    with srv:
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(f"nbd://127.0.0.1:{srv.port}/disk")  # plaintext: refused
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki.good))
        h.connect_uri(f"nbds://127.0.0.1:{srv.port}/disk")
        assert h.get_size() == 1 << 20
        h.shutdown()
        srv.assert_healthy()


def test_sigterm_with_an_idle_tls_client_exits_cleanly(tmp_path, pki):
    """An idle client never answers close_notify; shutdown must not wait for it forever."""
    with BaselineServer(tmp_path, [f"disk={tmp_path / 'd.img'},size=1M"],
                        extra_args=["--tls-mode", "required", "--tls-dir", str(pki.good)]) as srv:
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki.good))
        h.connect_uri(f"nbds://127.0.0.1:{srv.port}/disk")
        h.pread(4096, 0)
        assert srv.terminate() == 0
        assert "Traceback" not in srv.stderr_text()


def test_sigterm_with_a_client_stuck_in_the_tls_handshake(tmp_path, pki):
    """STARTTLS acknowledged, then silence: the upgrade must not hold the shutdown."""
    from nbdserver.protocol.constants import NBD_OPT_STARTTLS, NBD_REP_ACK
    from tests.helpers.nbdraw import RawClient
    with BaselineServer(tmp_path, [f"disk={tmp_path / 'd.img'},size=1M"],
                        extra_args=["--tls-mode", "required", "--tls-dir", str(pki.good)]) as srv:
        with RawClient(srv.address) as c:
            c.start()
            c.send_option(NBD_OPT_STARTTLS)
            assert c.option_reply()[1] == NBD_REP_ACK
            assert srv.terminate() == 0
        assert "Traceback" not in srv.stderr_text()


def nbdserver_serve(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbdserver.cli", "serve", "--data-dir", "/nonexistent",
                           "--keyservice-credential", "/dev/null", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_nbdserver_serve_refusals(pki):
    r = nbdserver_serve("--nbd-listen", "0.0.0.0:0", "--keyservice-url", "http://127.0.0.1:1")
    assert r.returncode == 2 and "required by default" in r.stderr
    r = nbdserver_serve("--keyservice-url", "http://10.9.9.9:8443")
    assert r.returncode == 2 and "refusing plain HTTP to the key service" in r.stderr
    r = nbdserver_serve("--keyservice-url", "http://127.0.0.1:1",
                        "--keyservice-ca", str(pki.good / "ca-cert.pem"))
    assert r.returncode == 2 and "not https" in r.stderr.replace("plain http", "not https")
