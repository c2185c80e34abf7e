"""daemonkit/tlsca.py: the CA tooling, checked with OpenSSL's command line as the oracle."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from daemonkit.tlsca import CaError, check_private_file, init_ca
from tests.helpers.servers import ROOT

FILES = ["ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
         "client-key.pem"]


def openssl_verify(ca, cert, purpose) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca), str(cert)],
                          capture_output=True, text=True)


def test_layout_modes_and_chain(pki):
    d = pki.good
    for name in FILES:
        mode = stat.S_IMODE(os.stat(d / name).st_mode)
        if name.endswith("-key.pem"):
            assert mode == 0o600, f"{name} is {mode:o}"
        else:
            assert not mode & 0o022
    assert openssl_verify(d / "ca-cert.pem", d / "server-cert.pem", "sslserver").returncode == 0
    assert openssl_verify(d / "ca-cert.pem", d / "client-cert.pem", "sslclient").returncode == 0
    # A client certificate is no server certificate, and another CA vouches for neither.
    assert openssl_verify(d / "ca-cert.pem", d / "client-cert.pem", "sslserver").returncode != 0
    assert openssl_verify(pki.rogue / "ca-cert.pem", d / "server-cert.pem", "sslserver").returncode != 0


def test_server_sans_cover_loopback_and_given_hosts(pki):
    cert = x509.load_pem_x509_certificate((pki.good / "server-cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "nbd.test"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("::1")}


def test_existing_ca_is_kept_unless_forced(tmp_path):
    init_ca(tmp_path)
    ca = (tmp_path / "ca-cert.pem").read_bytes()
    old_server = (tmp_path / "server-cert.pem").read_bytes()
    init_ca(tmp_path, hosts=["new.test"])
    assert (tmp_path / "ca-cert.pem").read_bytes() == ca  # clients keep trusting the server
    assert (tmp_path / "server-cert.pem").read_bytes() != old_server
    init_ca(tmp_path, force=True)
    assert (tmp_path / "ca-cert.pem").read_bytes() != ca


def test_private_key_readable_by_others_is_refused(tmp_path):
    key = tmp_path / "k.pem"
    key.write_bytes(b"x")
    key.chmod(0o644)
    with pytest.raises(CaError, match="readable or writable by others"):
        check_private_file(key)
    key.chmod(0o620)
    with pytest.raises(CaError, match="writable by others"):
        check_private_file(key)
    for ok in (0o600, 0o400, 0o640):  # 0640 root:ssl-cert is Debian's convention
        key.chmod(ok)
        check_private_file(key)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
def test_private_key_owned_by_another_user_is_refused(tmp_path):
    """ssh's rule: a 0600 file another user owns is that user's to widen or swap."""
    key = tmp_path / "k.pem"
    key.write_bytes(b"x")
    key.chmod(0o600)
    os.chown(key, 4242, 4242)
    with pytest.raises(CaError, match="owned by uid 4242"):
        check_private_file(key)
    os.chown(key, 0, 4242)  # root's, with a group: Debian's root:ssl-cert shape
    check_private_file(key)


@pytest.mark.parametrize("cli", ["nbdserver.cli", "keyservice"])
def test_tls_init_commands(tmp_path, cli):
    argv = [sys.executable, "-m", cli, "tls", "init", str(tmp_path / "d"), "--host", "10.1.2.3"]
    if cli == "nbdserver.cli":
        argv += ["--psk-identity", "bob"]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)["written"]
    assert set(FILES) <= set(written)
    if cli == "nbdserver.cli":
        line = (tmp_path / "d" / "keys.psk").read_text().strip()
        ident, key = line.split(":")
        assert ident == "bob" and len(bytes.fromhex(key)) == 32
        assert stat.S_IMODE(os.stat(tmp_path / "d" / "keys.psk").st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "d" / "server-cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)


def test_ca_key_not_kept_or_kept_only_where_asked(tmp_path):
    # Not kept: the leaves are signed, the CA key existed only in memory.
    bare = tmp_path / "bare"
    written = init_ca(bare, keep_ca_key=False)
    assert not (bare / "ca-key.pem").exists() and bare / "ca-key.pem" not in written
    assert openssl_verify(bare / "ca-cert.pem", bare / "server-cert.pem", "sslserver").returncode == 0
    with pytest.raises(CaError, match="no private key"):
        init_ca(bare, hosts=["more.test"])  # cannot sign more without it, and says so
    # Kept elsewhere, 0600; the CA is reused from there; the directory holds no key.
    d, away = tmp_path / "d", tmp_path / "media" / "ca-key.pem"
    init_ca(d, ca_key_file=away)
    assert not (d / "ca-key.pem").exists()
    assert stat.S_IMODE(os.stat(away).st_mode) == 0o600
    ca = (d / "ca-cert.pem").read_bytes()
    init_ca(d, hosts=["more.test"], ca_key_file=away)
    assert (d / "ca-cert.pem").read_bytes() == ca
    assert openssl_verify(d / "ca-cert.pem", d / "server-cert.pem", "sslserver").returncode == 0
    # A forced new CA leaves no key of the old one behind.
    old = tmp_path / "old"
    init_ca(old)
    init_ca(old, force=True, keep_ca_key=False)
    assert not (old / "ca-key.pem").exists()
