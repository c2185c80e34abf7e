"""What crosses the wire: a TCP proxy between libnbd and the server records every byte.

The control run (TLS off) must show the written pattern in the capture: that proves the
capture sees the data. The TLS run must not show any 32-byte piece of it, nor the export
name, in either direction.
"""

from __future__ import annotations

import os
import socket
import threading

import nbd
import pytest

pytestmark = pytest.mark.timeout(120)


class RecordingProxy:
    """Accepts on 127.0.0.1:<port>, forwards to `target`, records both directions."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            self._start(self._pump, client, server)
            self._start(self._pump, server, client)

    def _pump(self, src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_and_read_through(proxy: RecordingProxy, pattern: bytes, certs=None) -> None:
    h = nbd.NBD()
    if certs is not None:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certs))
    h.connect_uri(f"nbd://127.0.0.1:{proxy.port}/secretexportname")
    h.pwrite(pattern, 1 << 20)
    h.flush()
    assert h.pread(len(pattern), 1 << 20) == pattern
    h.shutdown()


def pieces(pattern: bytes, size: int = 32):
    return (pattern[i:i + size] for i in range(0, len(pattern) - size, 997))


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext-control", "tls"])
def test_no_plaintext_on_the_wire(tls_server, pki, tmp_path, tls):
    args = ("--tls-mode", "required", "--tls-dir", str(pki.good)) if tls else ("--tls-mode", "off")
    srv = tls_server(*args, exports=[f"secretexportname={tmp_path / 'w.img'},size=8M"])
    # Text-like, recognisable, and not compressible into something else by anyone.
    pattern = ((b"CANARY-" + os.urandom(8).hex().encode() + b"-") * (256 * 1024 // 24 + 1))[:256 * 1024]
    with RecordingProxy(srv.address) as proxy:
        write_and_read_through(proxy, pattern, pki.good if tls else None)
        wire = bytes(proxy.captured)
    assert len(wire) > 2 * len(pattern)  # both the write and the read went through
    if tls:
        assert not any(p in wire for p in pieces(pattern)), "plaintext of the pattern on the wire"
        assert b"CANARY-" not in wire and b"secretexportname" not in wire
    else:
        assert pattern in wire and b"secretexportname" in wire
