"""NBD over TLS with real clients: nbdinfo, the libnbd bindings, qemu-img, fio.

Each client proves the same two things: with the right credentials it reads and writes
through STARTTLS, and without them (no certificate, another CA's certificate, a wrong
PSK, plaintext under `required`) it is refused, while the server stays healthy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import nbd
import pytest

from nbdserver.protocol.constants import (
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_STARTTLS,
    NBD_REP_ACK,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNSUP,
    NBD_REP_SERVER,
)
from tests.helpers.images import need_tool
from tests.helpers.nbdraw import RawClient, ServerClosed
from tests.helpers.servers import wait_until
from tests.tls.conftest import PSK_IDENTITY, cert_uri, psk_uri

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def run(*argv, ok: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    need_tool(argv[0])
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if ok:
        assert p.returncode == 0, f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def refused(*argv) -> str:
    p = run(*argv, ok=False)
    assert p.returncode != 0, f"{argv} was not refused:\n{p.stdout}"
    return p.stderr


def x509(pki, *extra):
    return ("--tls-mode", "required", "--tls-dir", str(pki.good), *extra)


# ------------------------------------------------------------------ X.509
def test_nbdinfo_with_certificates(tls_server, pki):
    srv = tls_server(*x509(pki))
    out = run("nbdinfo", "--json", cert_uri(srv, pki.good)).stdout
    info = json.loads(out)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 64 * MiB
    # The server's certificate must chain to the CA the client trusts.
    assert "certificate" in refused("nbdinfo", cert_uri(srv, pki.rogue)).lower()


def test_libnbd_read_write_with_client_certificate(tls_server, pki):
    srv = tls_server(*x509(pki, "--tls-verify-clients"))
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki.good))
    h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
    assert h.get_tls_negotiated()
    data = os.urandom(MiB)
    h.pwrite(data, 3 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(MiB, 3 * MiB) == data
    h.shutdown()
    assert "client certificate CN=client" in srv.stderr_text()


@pytest.mark.parametrize("certs", ["no_client", "rogue"])
def test_client_without_a_trusted_certificate_is_refused(tls_server, pki, certs):
    srv = tls_server(*x509(pki, "--tls-verify-clients"))
    # rogue's own CA would not trust our server either; give it our CA with its client cert.
    d = getattr(pki, certs)
    if certs == "rogue":
        d = _mixed_dir(pki.good / "ca-cert.pem", pki.rogue)
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(d))
    with pytest.raises(nbd.Error):
        h.connect_uri(f"nbds://{srv.host}:{srv.port}/disk")
        h.pread(4096, 0)  # TLS 1.3: a refused client certificate may only show on first use
    # The server's side of the refusal may be logged just after the client gave up.
    wait_until(lambda: "TLS handshake failed" in srv.stderr_text(), what="the refusal in the log")
    srv.assert_healthy()


def _mixed_dir(ca_cert, client_from):
    d = tempfile.mkdtemp(dir=client_from.parent)
    shutil.copy(ca_cert, os.path.join(d, "ca-cert.pem"))
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(client_from / name, os.path.join(d, name))
    return d


def test_qemu_img_with_tls_creds_x509(tls_server, pki, tmp_path):
    srv = tls_server(*x509(pki, "--tls-verify-clients"))
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki.good}"
    opts = f"driver=nbd,host={srv.host},port={srv.port},export=disk,tls-creds=tls0"
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(4 * MiB))
    run("qemu-img", "convert", "-n", "--object", obj, "-f", "raw", str(src), "--target-image-opts", opts)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "--object", obj, "--image-opts", opts, "-O", "raw", str(back))
    assert back.stat().st_size == 64 * MiB
    with open(back, "rb") as f:
        assert f.read(4 * MiB) == src.read_bytes()
    # Without the credentials object qemu speaks plaintext, which `required` refuses.
    refused("qemu-img", "info", f"nbd://{srv.host}:{srv.port}/disk")


def test_fio_over_nbds(tls_server, pki):
    """fio's nbd engine takes only a URI, and libnbd refuses `tls-certificates=` in URIs
    from such programs; it reads its default directory, $HOME/.pki/libnbd, for a non-root
    user (root's is /etc/pki/libnbd, which a test must not touch). So fio runs as nobody."""
    need_tool("fio", "setpriv")
    srv = tls_server(*x509(pki, "--tls-verify-clients"))
    home = tempfile.mkdtemp(prefix="fio-tls-")
    try:
        certs = os.path.join(home, ".pki", "libnbd")
        os.makedirs(certs)
        for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
            shutil.copy(pki.good / name, certs)
        for root, dirs, files in os.walk(home):
            for n in dirs + files + ["."]:
                shutil.chown(os.path.join(root, n), "nobody", "nogroup")
        os.chmod(home, 0o700)
        p = run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env", f"HOME={home}",
                "fio", "--name=tls", "--ioengine=nbd", f"--uri=nbds://{srv.host}:{srv.port}/disk",
                "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=8", "--verify=crc32c",
                "--output-format=json", cwd=home, timeout=90)
        job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 8 * MiB
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_nbd_client_lists_exports_over_tls(tls_server, pki):
    """nbd-client (the kernel driver's userspace) with the TLS options `attach` passes
    (`host.nbdclient.attach_argv`); its list mode needs no /dev/nbd, which this machine
    lacks."""
    from nbdserver.host.nbdclient import attach_argv
    srv = tls_server(*x509(pki, "--tls-verify-clients"))
    argv = attach_argv(srv.host, srv.port, "/dev/nbd0", "disk", 1, persist=False, tls_dir=str(pki.good))
    args = argv[argv.index("-x"):]
    out = run("nbd-client", *args, "-l", srv.host, str(srv.port)).stdout
    assert "disk" in out
    p = run("nbd-client", "-l", srv.host, str(srv.port), ok=False)
    assert p.returncode != 0 and "TLS is required" in p.stdout + p.stderr


@pytest.mark.parametrize("auth", ["x509", "psk"])
def test_nbdfuse_mounts_a_tls_export(tls_server, pki, tmp_path, auth):
    """The `attach --via fuse` path: nbdfuse with the source `host.fuse.tls_source`
    gives (certificates); with a PSK, which `attach` does not offer, nbdkit's own
    parameters reach the server's PSK callback the same way."""
    from nbdserver.host.fuse import tls_source
    need_tool("nbdfuse", "nbdkit", "fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    srv = tls_server("--tls-mode", "required", "--tls-dir", str(pki.good), "--tls-verify-clients",
                     "--tls-psk-file", str(pki.good / "keys.psk"))
    if auth == "x509":
        source = tls_source(srv.host, srv.port, "disk", str(pki.good))
    else:
        source = ["--command", "nbdkit", "-s", "--exit-with-parent", "nbd", f"hostname={srv.host}",
                  f"port={srv.port}", "export=disk", "tls=require",
                  f"tls-psk={pki.good / 'keys.psk'}", f"tls-username={PSK_IDENTITY}"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = open(tmp_path / "nbdfuse.log", "wb")
    fuse = subprocess.Popen(["nbdfuse", str(mnt), *source],
                            stdout=log, stderr=log)
    try:
        wait_until(lambda: fuse.poll() is not None or (mnt / "nbd").exists(), 20, what="nbdfuse")
        assert fuse.poll() is None, (tmp_path / "nbdfuse.log").read_text()
        data = os.urandom(MiB)
        with open(mnt / "nbd", "r+b") as f:
            f.seek(5 * MiB)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            f.seek(5 * MiB)
            assert f.read(MiB) == data
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            fuse.wait(timeout=20)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
        log.close()


# ------------------------------------------------------------------ PSK
def test_psk_nbdinfo_and_qemu(tls_server, pki):
    srv = tls_server("--tls-mode", "required", "--tls-psk-file", str(pki.good / "keys.psk"))
    info = json.loads(run("nbdinfo", "--json", psk_uri(srv, pki.good / "keys.psk")).stdout)
    assert info["TLS"] is True
    obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={pki.good},username={PSK_IDENTITY}"
    run("qemu-io", "--object", obj, "--image-opts",
        f"driver=nbd,host={srv.host},port={srv.port},export=disk,tls-creds=tls0",
        "-c", "write -P 0x3c 0 1M", "-c", "read -P 0x3c 0 1M")


@pytest.mark.parametrize("creds", ["x509", "psk"])
def test_tls12_accepted_and_older_refused(tls_server, pki, creds):
    """qemu's GnuTLS priority string picks the version: TLS 1.2 (the (EC)DHE-PSK suites
    for PSK) works; TLS 1.1 is refused."""
    srv = tls_server(*x509(pki), "--tls-psk-file", str(pki.good / "keys.psk"))
    base = (f"tls-creds-x509,id=tls0,endpoint=client,dir={pki.good}" if creds == "x509" else
            f"tls-creds-psk,id=tls0,endpoint=client,dir={pki.good},username={PSK_IDENTITY}")
    opts = f"driver=nbd,host={srv.host},port={srv.port},export=disk,tls-creds=tls0"
    run("qemu-img", "info", "--object", base + ",priority=NORMAL:-VERS-TLS1.3", "--image-opts", opts)
    refused("qemu-img", "info", "--object", base + ",priority=NORMAL:-VERS-TLS-ALL:+VERS-TLS1.1",
            "--image-opts", opts)


def test_psk_and_certificates_on_one_server(tls_server, pki):
    srv = tls_server(*x509(pki), "--tls-psk-file", str(pki.good / "keys.psk"))
    run("nbdinfo", "--size", psk_uri(srv, pki.good / "keys.psk"))
    run("nbdinfo", "--size", cert_uri(srv, pki.good))


def test_psk_wrong_key_or_identity_refused(tls_server, pki):
    srv = tls_server("--tls-mode", "required", "--tls-psk-file", str(pki.good / "keys.psk"))
    refused("nbdinfo", psk_uri(srv, pki.wrong_psk / "keys.psk"))
    bob = pki.wrong_psk.parent / "bob.psk"
    bob.write_text((pki.good / "keys.psk").read_text().replace(PSK_IDENTITY, "bob"))
    bob.chmod(0o600)
    refused("nbdinfo", psk_uri(srv, bob, identity="bob"))
    assert "unknown identity 'bob'" in srv.stderr_text()


# ------------------------------------------------------------------ modes
def test_required_refuses_plaintext_and_hides_exports(tls_server, pki):
    srv = tls_server(*x509(pki))
    refused("nbdinfo", f"nbd://{srv.host}:{srv.port}/disk")
    with RawClient(srv.address) as c:
        c.start()
        for option in (NBD_OPT_LIST, NBD_OPT_INFO, NBD_OPT_GO):
            data = b"" if option == NBD_OPT_LIST else b"\0\0\0\4disk\0\0"
            c.send_option(option, data)
            replies = c.replies_until_final()
            assert [r[1] for r in replies] == [NBD_REP_ERR_TLS_REQD], replies
            assert all(r[1] != NBD_REP_SERVER for r in replies)
        c.send_option(NBD_OPT_EXPORT_NAME, b"disk")
        with pytest.raises(ServerClosed):
            c.recv_exact(8)
    # Plaintext after the STARTTLS ACK is no TLS handshake: the server hangs up.
    with RawClient(srv.address) as c:
        c.start()
        c.send_option(NBD_OPT_STARTTLS)
        assert c.option_reply()[1] == NBD_REP_ACK
        c.send(b"not a ClientHello" * 8)
        assert c.closed_by_server()


def test_optional_serves_both_and_off_refuses_starttls(tls_server, pki, tmp_path):
    srv = tls_server("--tls-mode", "optional", "--tls-dir", str(pki.good))
    assert json.loads(run("nbdinfo", "--json", cert_uri(srv, pki.good)).stdout)["TLS"] is True
    assert json.loads(run("nbdinfo", "--json", f"nbd://{srv.host}:{srv.port}/disk").stdout)["TLS"] is False
    off = tls_server("--tls-mode", "off", exports=[f"d2={tmp_path / 'd2.img'},size=1M"])
    with RawClient(off.address) as c:
        c.start()
        c.send_option(NBD_OPT_STARTTLS)
        assert c.option_reply()[1] == NBD_REP_ERR_UNSUP
    refused("nbdinfo", cert_uri(off, pki.good, "d2"))
