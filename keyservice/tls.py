"""HTTPS for the key service's listener: the server's SSL context and the plain-HTTP rule.

The key service hands out unwrapped DEKs; over plain HTTP anyone on the path reads them.
So plain HTTP is allowed only where nobody else is on the path (a loopback listener)
or when the operator says so explicitly (`--insecure-plain-http`, e.g. a TLS-terminating
proxy on the same host). Certificates come from `keyservice tls init` (tlsca.py) or a
real CA: the file names are the same (server-cert.pem, server-key.pem, ca-cert.pem).
The clients' side (`client_context`, `client_ssl_for`) is in client.py.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from daemonkit.https import server_context  # the platform API's listener uses it too
from daemonkit.tls import TlsConfigError, is_loopback
from daemonkit.tlsca import SERVER_CERT, SERVER_KEY


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
