"""`nbdserver attach --tls-dir` against a server that requires TLS: the fuse path over
nbds:// (libnbd checks the server's certificate against the CA), the exact nbd-client
TLS options from a real TLS handshake, and plain refusals."""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers.platform import Stack
from tests.helpers.servers import ROOT
from tests.host.hostutil import require_fuse_path, sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    sh(sys.executable, "-m", "nbdserver.cli", "tls", "init", d, cwd=ROOT)
    return d


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory, run_dir, tls):
    with Stack(tmp_path_factory.mktemp("tlsstack"),
               nbd_args=["--tls-mode", "required", "--tls-dir", str(tls)]) as s:
        s.create_disk("t1", "--size", "16M")
        yield s
        s.assert_healthy()


def test_fuse_attach_over_tls(tls_stack, tls):
    require_fuse_path()
    a = tls_stack.nbdserver("attach", "t1", "--via", "fuse", "--tls-dir", tls)
    try:
        dev = a["device"]
        block = bytes(range(256)) * 16
        with open(dev, "r+b", buffering=0) as f:
            f.seek(8192)
            f.write(block)
            os.fsync(f.fileno())
        sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        with open(dev, "rb", buffering=0) as f:
            f.seek(8192)
            assert f.read(4096) == block
    finally:
        tls_stack.nbdserver("detach", a["device"])
    # The data went through the TLS server: read it back with an independent client.
    h = tls_handle(tls_stack, tls)
    assert h.pread(4096, 8192) == block
    h.shutdown()


def test_nbd_dry_run_with_tls(tls_stack, tls):
    host, port = tls_stack.nb.nbd_address.rsplit(":", 1)
    out = tls_stack.nbdserver("attach", "t1", "--dry-run", "--device", "/dev/nbd1", "--tls-dir", tls)
    assert out["argv"] == ["nbd-client", "-N", "t1", host, port, "/dev/nbd1", "-b", "4096",
                           "-x", "-cacertfile", f"{tls}/ca-cert.pem", "-certfile", f"{tls}/client-cert.pem",
                           "-keyfile", f"{tls}/client-key.pem", "-p"]


def test_tls_refusals(tls_stack, tls, tmp_path):
    r = tls_stack.nbdserver("attach", "t1", "--via", "fuse", check=False)
    assert r.returncode == 1 and "cannot open disk 't1'" in r.stderr and "Traceback" not in r.stderr
    r = tls_stack.nbdserver("attach", "t1", "--via", "fuse", "--tls-dir", tmp_path, check=False)
    assert r.returncode == 1 and "lacks ca-cert.pem, client-cert.pem, client-key.pem" in r.stderr
    r = tls_stack.nbdserver("attach", "t1", "--via", "fuse", "--tls-dir", tls, "--connections", "2",
                            check=False)
    assert r.returncode == 1 and "uses one connection" in r.stderr


def tls_handle(stack, tls):
    import nbd
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(tls))
    host, port = stack.nb.nbd_address.rsplit(":", 1)
    h.set_export_name("t1")
    h.connect_tcp(host, port)
    return h
