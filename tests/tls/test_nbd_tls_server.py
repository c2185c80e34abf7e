"""server.py's STARTTLS upgrade on both event loops the server may run on.

The daemons run on uvloop; asyncio's own loop is the fallback (runtime.py). Under
asyncio the TLS layer hands the client's first encrypted option to the protocol before
`start_tls()` returns, which once closed such connections as "data sent before the TLS
handshake". Many short TLS sessions on each loop catch that ordering.
"""

from __future__ import annotations

import asyncio

import nbd
import pytest

from nbdserver.backend import FileBackend
from nbdserver.exports import Export, ExportCatalog
from nbdserver.protocol.handshake import TlsMode
from nbdserver.tls import ServerTls
from tests.helpers.inproc import ServerThread

pytestmark = pytest.mark.timeout(120)
SESSIONS = 20


def _uvloop():
    uvloop = pytest.importorskip("uvloop")
    return uvloop.new_event_loop()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, _uvloop], ids=["asyncio", "uvloop"])
def test_many_tls_sessions(tmp_path, pki, loop_factory):
    catalog = ExportCatalog()
    catalog.add(Export("disk", FileBackend(str(tmp_path / "d.img"), size=1 << 20)))
    catalog.default = "disk"
    with ServerThread(loop_factory, catalog, tls_mode=TlsMode.REQUIRED,
                      tls_context=ServerTls(cert_dir=str(pki.good)).context()) as srv:
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
