"""TLS-PSK through Python 3.13's `SSLContext.set_psk_server_callback`.

No Python 3.13 can be installed on these hosts (Debian bookworm has 3.11 only), so the
3.13 method is stood in for by a subclass that records what enable_psk hands it; the
real handshakes over PSK on 3.11 are in test_nbd_tls_clients.py."""

from __future__ import annotations

import ssl

from nbdserver.tls import enable_psk


class Py313Context(ssl.SSLContext):
    def set_psk_server_callback(self, callback, identity_hint=None):
        self.psk = (callback, identity_hint)


def test_python_313_uses_its_own_psk_hook_and_refuses_unknown_identities():
    ctx = Py313Context(ssl.PROTOCOL_TLS_SERVER)
    enable_psk(ctx, {"alice": b"k" * 32}, hint="nbdserver")
    callback, hint = ctx.psk
    assert hint == "nbdserver"
    assert callback("alice") == b"k" * 32
    assert callback("mallory") == b""  # a zero-length PSK is 3.13's refusal
    assert callback(None) == b""
    assert not hasattr(ctx, "_nbd_psk_callback")  # the ctypes thunk was not installed
