"""TLS for NBD: the server's SSL context (X.509 and TLS-PSK) and the default mode.

The protocol side (NBD_OPT_STARTTLS, the OFF/OPTIONAL/REQUIRED modes) is pure and lives
in protocol/handshake.py; server.py upgrades the asyncio transport with
`loop.start_tls`. This module only builds the `ssl.SSLContext` that upgrade uses; the
clients' command lines are built where they are run (host/nbdclient.py, host/fuse.py).

Files follow the GnuTLS/qemu naming that `tls init` writes (daemonkit/tlsca.py):
`server-cert.pem`, `server-key.pem`, `ca-cert.pem` in one directory. A PSK file is in
psktool's format, one `identity:hexkey` a line, the same file a libnbd or qemu client
reads (`tls-psk-file=`), so one file serves both ends.

TLS-PSK: from Python 3.13 the callback goes through `SSLContext.set_psk_server_callback`;
before, and on every version for TLS 1.3 cipher suites (no Python has an API for them,
and PSK needs them, see enable_psk), the OpenSSL calls (SSL_CTX_set_psk_server_callback,
SSL_CTX_set_ciphersuites) are
made through ctypes on the context's SSL_CTX, resolved through the `_ssl` extension's
own handle so it is the very libssl Python links. There is no public accessor for the
SSL_CTX pointer: it is the first field after PyObject_HEAD in CPython's PySSLContext
(Modules/_ssl.c), and we check that guess through OpenSSL before using it (the
options and verify mode OpenSSL reports must be the ones Python set), so a layout
change fails with a clear error rather than memory corruption. OpenSSL runs the
callback for TLS 1.2 PSK suites and, for TLS 1.3, as an external SHA-256 PSK
(SSL_CTX_set_psk_server_callback(3)); GnuTLS clients use either.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from daemonkit.fips import random_bytes
from daemonkit.tls import TlsConfigError, is_loopback
from daemonkit.tlsca import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    CaError,
    check_private_file,
)

from .protocol.handshake import TlsMode

log = logging.getLogger("nbdserver.tls")

# PSK suites for TLS 1.2 peers; TLS 1.3 suites are OpenSSL's defaults. All (EC)DHE:
# forward secrecy even when the PSK leaks later. No plain-PSK or RSA-PSK suites.
PSK_TLS12_CIPHERS = "ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256"
CERT_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM"
TLS13_SUITES_SHA256_FIRST = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
# RFC 4279 allows identities up to 2^16-1 bytes; GnuTLS's psktool keys are 32 bytes.
MIN_PSK_BYTES = 16
MAX_PSK_BYTES = 256


__all__ = ["TlsConfigError", "is_loopback"]  # re-exported: the errors of this module's calls


# ----------------------------------------------------------------------- the mode
def default_mode(listen_host: str) -> TlsMode:
    """REQUIRED unless the NBD listener is loopback-only: the issue's rule that a real
    deployment cannot forget TLS. Decrypted disk data crosses that socket."""
    return TlsMode.OFF if is_loopback(listen_host) else TlsMode.REQUIRED


def resolve_mode(mode: str | None, listen_host: str) -> TlsMode:
    return default_mode(listen_host) if mode is None else TlsMode(mode)


# ----------------------------------------------------------------------- PSK files
def load_psk_file(path) -> dict[str, bytes]:
    """identity -> key from a psktool-format file (`identity:hexkey` per line)."""
    try:
        check_private_file(path)
        text = Path(path).read_text()
    except CaError as e:
        raise TlsConfigError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TlsConfigError(f"cannot read PSK file {path}: {e}") from None
    keys: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ident, sep, hexkey = line.rpartition(":")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not sep or not ident:
            raise TlsConfigError(f"{path}:{n}: expected identity:hexkey")
        if not MIN_PSK_BYTES <= len(key) <= MAX_PSK_BYTES:
            raise TlsConfigError(f"{path}:{n}: key of {ident!r} must be {MIN_PSK_BYTES}.."
                                 f"{MAX_PSK_BYTES} bytes of hex")
        keys[ident] = key
    if not keys:
        raise TlsConfigError(f"{path}: no keys")
    return keys


def write_psk_file(path, identity: str, key: bytes | None = None) -> Path:
    """Add (or replace) `identity` in a psktool-format file, 0600; a fresh 32-byte key by default."""
    from daemonkit.tlsca import write_private
    if ":" in identity or not identity.isprintable() or not identity:
        raise TlsConfigError(f"bad PSK identity {identity!r}")
    key = key if key is not None else random_bytes(32)
    path = Path(path)
    lines = []
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.rpartition(":")[0] != identity]
    lines.append(f"{identity}:{key.hex()}")
    write_private(path, ("\n".join(lines) + "\n").encode())
    return path


# ----------------------------------------------------------------------- PSK on the context
_PSK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                 ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)


def _libssl():
    import _ssl
    lib = ctypes.CDLL(_ssl.__file__)  # dlsym through it finds the libssl _ssl links
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_set_psk_server_callback.restype = None
    lib.SSL_CTX_set_psk_server_callback.argtypes = [ctypes.c_void_p, _PSK_CALLBACK]
    lib.SSL_CTX_use_psk_identity_hint.restype = ctypes.c_int
    lib.SSL_CTX_use_psk_identity_hint.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


def _ssl_ctx_pointer(lib, ctx: ssl.SSLContext) -> int:
    """The SSL_CTX* inside a CPython SSLContext, checked through OpenSSL before use."""
    if sys.implementation.name != "cpython":
        raise TlsConfigError("TLS-PSK needs CPython (it reaches OpenSSL under ssl.SSLContext)")
    head = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)  # PyObject_HEAD
    ptr = ctypes.c_void_p.from_address(id(ctx) + head).value
    saved = ctx.verify_mode
    try:
        ok = bool(ptr) and lib.SSL_CTX_get_options(ptr) == int(ctx.options)
        if ok:
            ctx.verify_mode = ssl.CERT_OPTIONAL  # SSL_VERIFY_PEER
            ok = lib.SSL_CTX_get_verify_mode(ptr) == 1
            ctx.verify_mode = ssl.CERT_NONE
            ok = ok and lib.SSL_CTX_get_verify_mode(ptr) == 0
    finally:
        ctx.verify_mode = saved
    if not ok or not ptr:
        raise TlsConfigError("cannot reach OpenSSL's SSL_CTX of this Python for TLS-PSK; "
                             "use X.509 certificates")
    return ptr


def _lookup(keys: dict[str, bytes], identity: bytes | str | None) -> bytes | None:
    if identity is None:
        return None
    name = identity.decode("utf-8", "replace") if isinstance(identity, bytes) else identity
    key = keys.get(name)
    if key is None:
        log.info("TLS-PSK: unknown identity %r", name)
    else:
        log.info("TLS-PSK: identity %r", name)
    return key


def enable_psk(ctx: ssl.SSLContext, keys: dict[str, bytes], hint: str = "nbdserver") -> None:
    """Let clients authenticate with one of `keys` (identity -> key) instead of certificates."""
    ctx.set_ciphers(f"{CERT_TLS12_CIPHERS}:{PSK_TLS12_CIPHERS}")
    lib = _libssl()
    ptr = _ssl_ctx_pointer(lib, ctx)
    if hasattr(ctx, "set_psk_server_callback"):  # Python 3.13 and later
        _enable_psk_public(ctx, keys, hint)
    else:
        _enable_psk_ctypes(lib, ptr, ctx, keys, hint)
    # OpenSSL picks the TLS 1.3 suite before it asks for the PSK, and a callback PSK is
    # a SHA-256 one: with a certificate loaded, a SHA-384 suite first made OpenSSL skip
    # the PSK and GnuTLS PSK clients failed ("Insufficient credentials"). SHA-256 first.
    # No Python version has an API for TLS 1.3 suites, so this one call stays in ctypes.
    if lib.SSL_CTX_set_ciphersuites(ptr, TLS13_SUITES_SHA256_FIRST) != 1:
        raise TlsConfigError("OpenSSL refused the TLS 1.3 cipher suites")


def _enable_psk_public(ctx: ssl.SSLContext, keys: dict[str, bytes], hint: str) -> None:
    """Python 3.13's own PSK hook: the callback returns the key, b"" refuses."""
    def callback(identity: str | None) -> bytes:
        return _lookup(keys, identity) or b""

    ctx.set_psk_server_callback(callback, identity_hint=hint)  # type: ignore[attr-defined]


def _enable_psk_ctypes(lib, ptr: int, ctx: ssl.SSLContext, keys: dict[str, bytes],
                       hint: str) -> None:
    """Before 3.13: SSL_CTX_set_psk_server_callback on the context's SSL_CTX."""
    def callback(_ssl_ptr, identity, psk, max_len):
        try:  # an exception here would only be printed by ctypes: fail the handshake instead
            key = _lookup(keys, identity)
            if key is None or len(key) > max_len:
                return 0
            ctypes.memmove(psk, key, len(key))
            return len(key)
        except Exception:
            log.exception("TLS-PSK callback failed")
            return 0

    cb = _PSK_CALLBACK(callback)
    # The C side holds only a raw pointer: the context keeps the thunk alive (an attribute
    # of our own on the ssl.SSLContext instance, hence setattr).
    setattr(ctx, "_nbd_psk_callback", cb)  # noqa: B010
    lib.SSL_CTX_set_psk_server_callback(ptr, cb)
    if lib.SSL_CTX_use_psk_identity_hint(ptr, hint.encode()) != 1:
        raise TlsConfigError("OpenSSL refused the PSK identity hint")


# ----------------------------------------------------------------------- the server context
@dataclass(frozen=True)
class ServerTls:
    """What `--tls-*` options ask for; `context()` builds (and checks) it."""
    cert_dir: str | None = None
    verify_clients: bool = False
    psk_file: str | None = None

    def context(self) -> ssl.SSLContext:
        if not self.cert_dir and not self.psk_file:
            raise TlsConfigError("TLS needs --tls-dir (certificates) or --tls-psk-file; the TLS mode "
                                 "is required by default when the listen address is not loopback "
                                 "(--tls-mode off to serve plaintext anyway)")
        if self.verify_clients and not self.cert_dir:
            raise TlsConfigError("--tls-verify-clients needs --tls-dir (its ca-cert.pem)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # TLS 1.2 is the oldest version without known protocol breaks; GnuTLS in Debian 12
        # and qemu speak 1.3 anyway.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION  # CRIME: compression leaks plaintext lengths
        if self.cert_dir:
            d = Path(self.cert_dir)
            cert, key, ca = d / SERVER_CERT, d / SERVER_KEY, d / CA_CERT
            try:
                check_private_file(key)
                ctx.load_cert_chain(cert, key)
            except CaError as e:
                raise TlsConfigError(str(e)) from None
            except (OSError, ssl.SSLError) as e:
                raise TlsConfigError(f"cannot load {cert} / {key}: {e}") from None
            if self.verify_clients:
                try:
                    ctx.load_verify_locations(cafile=str(ca))
                except (OSError, ssl.SSLError) as e:
                    raise TlsConfigError(f"cannot load the client CA {ca}: {e}") from None
                ctx.verify_mode = ssl.CERT_REQUIRED
        if self.psk_file:
            enable_psk(ctx, load_psk_file(self.psk_file))
        return ctx


def server_context_for(mode: TlsMode, settings: ServerTls) -> ssl.SSLContext | None:
    """The context for `mode`, or None when TLS is off; refuses settings that cannot work."""
    if mode is TlsMode.OFF:
        if settings.cert_dir or settings.psk_file:
            raise TlsConfigError("TLS files given but --tls-mode off")
        return None
    return settings.context()


def client_identity(ssl_object) -> str | None:
    """`CN=...` of a client certificate the server verified, else None (anonymous).
    getpeercert() is empty unless verification ran (--tls-verify-clients)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    cn = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return f"CN={cn[0] if cn else '?'}"


def tls_summary(ssl_object) -> str:
    """One log line's worth of an established session: version, suite, who the client is.
    (A PSK session has no peer certificate; the identity is logged by the callback.)"""
    if ssl_object is None:
        return "TLS"
    cipher = ssl_object.cipher()
    who = "no client certificate"
    cert = ssl_object.getpeercert()  # only set when verified (--tls-verify-clients)
    if cert:
        cn = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        who = f"client certificate CN={cn[0] if cn else '?'}"
    return f"{ssl_object.version()} {cipher[0] if cipher else '?'}, {who}"
