"""server.py's STARTTLS upgrade on both event loops the server may run on.

The daemons run on uvloop; asyncio's own loop is the fallback (runtime.py). Under
asyncio the TLS layer hands the client's first encrypted option to the protocol before
`start_tls()` returns, which once closed such connections as "data sent before the TLS
handshake". Many short TLS sessions on each loop catch that ordering.
"""

from __future__ import annotations

import asyncio
import threading

import nbd
import pytest

from nbdserver.backend import FileBackend
from nbdserver.exports import Export, ExportCatalog
from nbdserver.protocol.handshake import TlsMode
from nbdserver.server import NbdServer
from nbdserver.tls import ServerTls

pytestmark = pytest.mark.timeout(120)
SESSIONS = 20


class ServerThread:
    def __init__(self, loop_factory, catalog, context):
        self.loop = loop_factory()
        self.server = NbdServer(catalog, workers=2, tls_mode=TlsMode.REQUIRED, tls_context=context)
        self.port = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.port = self.loop.run_until_complete(self.server.listen("127.0.0.1", 0))[0][1]
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.shutdown(grace=5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _uvloop():
    uvloop = pytest.importorskip("uvloop")
    return uvloop.new_event_loop()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, _uvloop], ids=["asyncio", "uvloop"])
def test_many_tls_sessions(tmp_path, pki, loop_factory):
    catalog = ExportCatalog()
    catalog.add(Export("disk", FileBackend(str(tmp_path / "d.img"), size=1 << 20)))
    catalog.default = "disk"
    with ServerThread(loop_factory, catalog, ServerTls(cert_dir=str(pki.good)).context()) as srv:
        for i in range(SESSIONS):
            h = nbd.NBD()
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(str(pki.good))
            h.connect_uri(f"nbds://127.0.0.1:{srv.port}/disk")
            h.pwrite(bytes([i]) * 4096, 4096 * i)
            assert h.pread(4096, 4096 * i) == bytes([i]) * 4096
            h.shutdown()
    for e in catalog:
        e.backend.close()
