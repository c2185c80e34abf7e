"""HTTPS for the key service: the server's SSL context, the clients' one, the plain-HTTP rule.

The key service hands out unwrapped DEKs; over plain HTTP anyone on the path reads them.
So plain HTTP is allowed only where nobody else is on the path (a loopback listener)
or when the operator says so explicitly (`--insecure-plain-http`, e.g. a TLS-terminating
proxy on the same host). Certificates come from `keyservice tls init` (tlsca.py) or a
real CA: the file names are the same (server-cert.pem, server-key.pem, ca-cert.pem).
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from .tlsca import CA_CERT, SERVER_CERT, SERVER_KEY, CaError, check_private_file


class TlsConfigError(Exception):
    """HTTPS settings that cannot work, or plain HTTP where it is refused; says why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name, or a wildcard such as 0.0.0.0 or ""


def server_context(cert_file, key_file) -> ssl.SSLContext:
    try:
        check_private_file(key_file)
    except CaError as e:
        raise TlsConfigError(str(e)) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f"cannot load {cert_file} / {key_file}: {e}") from None
    return ctx


def server_context_from(tls_dir=None, cert=None, key=None) -> ssl.SSLContext | None:
    """From `--tls-dir` (server-cert.pem, server-key.pem) or `--tls-cert/--tls-key`."""
    if tls_dir and (cert or key):
        raise TlsConfigError("give --tls-dir or --tls-cert/--tls-key, not both")
    if tls_dir:
        return server_context(Path(tls_dir) / SERVER_CERT, Path(tls_dir) / SERVER_KEY)
    if bool(cert) != bool(key):
        raise TlsConfigError("--tls-cert and --tls-key go together")
    return server_context(cert, key) if cert else None


def check_plain_http(host: str, tls: bool, insecure_plain_http: bool) -> None:
    """Refuse plain HTTP on a listener others can reach, unless explicitly allowed."""
    if not tls and not insecure_plain_http and not is_loopback(host):
        raise TlsConfigError(
            f"refusing plain HTTP on {host or 'all addresses'}: keys would cross the network "
            "unencrypted. Give --tls-dir (see `keyservice tls init`) or, if a TLS proxy on this "
            "host fronts the service, --insecure-plain-http")


def client_context(cafile=None) -> ssl.SSLContext:
    """Verify the key service's certificate: against `cafile`, else the system's CAs."""
    try:
        ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f"cannot load the key service CA {cafile}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_ssl_for(url: str, cafile=None, insecure_plain_http: bool = False):
    """The `ssl=` a KeyServiceClient for `url` needs; refuses http:// to another host.

    https:// gets a verifying context (hostname checked, default CAs or `cafile`);
    http:// is fine to a loopback service, elsewhere only with `insecure_plain_http`.
    """
    parts = urlsplit(url)
    if parts.scheme == "https":
        return client_context(cafile)
    if parts.scheme != "http":
        raise TlsConfigError(f"key service URL must be https:// (or http:// on loopback): {url}")
    if cafile:
        raise TlsConfigError(f"a CA file was given but the key service URL is plain http: {url}")
    if not insecure_plain_http and not is_loopback(parts.hostname or ""):
        raise TlsConfigError(
            f"refusing plain HTTP to the key service at {url}: unwrapped keys would cross the "
            "network. Use https:// (and a CA file), or allow it explicitly "
            "(nbdserver serve --insecure-keyservice-http)")
    return None


def default_ca_file(tls_dir) -> Path:
    return Path(tls_dir) / CA_CERT
