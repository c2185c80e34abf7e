"""HTTPS for a daemon's HTTP listener, and the rule against plain HTTP off loopback.

A management API carries bearer tokens (whoever reads one in transit runs the API as its
holder), so plain HTTP is allowed only where nobody else is on the path (a loopback
listener) or when the operator says so explicitly (a TLS-terminating proxy on the same
host). `listener_tls_options` gives a click command the options for one listener
(`--api-tls-dir`, `--api-tls-cert/--api-tls-key`, `--insecure-api-plain-http`) and hands
it the resulting SSL context, or None for plain HTTP. Certificates come from `tls init`
(`tlsca`) or a real CA under the same file names.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

import click

from .tls import TlsConfigError, is_loopback
from .tlsca import SERVER_CERT, SERVER_KEY, CaError, check_private_file


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


def client_context(ca_file) -> ssl.SSLContext:
    """Verify the server against `ca_file` (hostname included)."""
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f"cannot load the CA certificate {ca_file}: {e}") from None


def listener_context(prefix: str, host: str, tls_dir=None, cert=None, key=None,
                     insecure_plain_http: bool = False) -> ssl.SSLContext | None:
    """The SSL context of the `prefix` listener on `host`, or None for plain HTTP where
    that is allowed."""
    if tls_dir and (cert or key):
        raise TlsConfigError(f"give --{prefix}-tls-dir or --{prefix}-tls-cert/--{prefix}-tls-key, "
                             "not both")
    if bool(cert) != bool(key):
        raise TlsConfigError(f"--{prefix}-tls-cert and --{prefix}-tls-key go together")
    if tls_dir:
        return server_context(Path(tls_dir) / SERVER_CERT, Path(tls_dir) / SERVER_KEY)
    if cert:
        return server_context(cert, key)
    if not insecure_plain_http and not is_loopback(host):
        raise TlsConfigError(
            f"refusing plain HTTP for the {prefix} listener on {host or 'all addresses'}: its "
            f"bearer token would cross the network unencrypted. Give --{prefix}-tls-dir (see "
            f"`tls init`) or, if a TLS proxy on this host fronts it, --insecure-{prefix}-plain-http")
    return None


def _listen_host(text) -> str:
    """The host a HOST:PORT, [V6]:PORT or HOST listener binds, read as the daemons'
    parse_hostport reads it: a bare HOST is a host, not a port, and "" (":8080") is every
    address. No listener (None) binds nothing."""
    if text is None:
        return "127.0.0.1"
    text = str(text)
    if text.startswith("["):
        return text[1:].partition("]")[0]
    host, sep, _ = text.rpartition(":")
    return host if sep else text


def listener_tls_options(prefix: str, listen_param: str):
    """Decorate a click command with one listener's TLS options; the command receives
    `{prefix}_ssl` (an SSLContext or None) instead of them. A bad combination, an
    unreadable or loose key, or plain HTTP off loopback is a usage error."""
    names = [f"{prefix}_tls_dir", f"{prefix}_tls_cert", f"{prefix}_tls_key",
             f"insecure_{prefix}_plain_http"]

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = [kwargs.pop(n) for n in names]
            host = _listen_host(kwargs[listen_param])
            try:
                kwargs[f"{prefix}_ssl"] = listener_context(prefix, host, *values)
            except TlsConfigError as e:
                raise click.UsageError(str(e)) from None
            return fn(*args, **kwargs)

        for opt in reversed([
            click.option(f"--{prefix}-tls-dir", type=click.Path(file_okay=False),
                         help=f"HTTPS for the {prefix} listener: DIR/server-cert.pem and "
                              "DIR/server-key.pem (see `tls init`)"),
            click.option(f"--{prefix}-tls-cert", type=click.Path(dir_okay=False),
                         help=f"HTTPS certificate of the {prefix} listener (with --{prefix}-tls-key)"),
            click.option(f"--{prefix}-tls-key", type=click.Path(dir_okay=False),
                         help="its private key (not readable by others)"),
            click.option(f"--insecure-{prefix}-plain-http", is_flag=True,
                         help=f"allow plain HTTP for the {prefix} listener off loopback (only "
                              "behind a TLS proxy on this host)"),
        ]):
            wrapper = opt(wrapper)
        return wrapper
    return decorate
