"""The NBD server in the test's own process, on an event loop in a thread: for tests that
must act on its state at a precise moment (lock an export, swap its backend) between
two bytes a client sends."""

from __future__ import annotations

import asyncio
import threading

from nbdserver.protocol.handshake import TlsMode
from nbdserver.server import NbdServer


class ServerThread:
    def __init__(self, loop_factory, catalog, *, tls_mode=TlsMode.OFF, tls_context=None):
        self.loop = loop_factory()
        self.server = NbdServer(catalog, workers=2, tls_mode=tls_mode, tls_context=tls_context)
        self.port = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.port = self.loop.run_until_complete(self.server.listen("127.0.0.1", 0))[0][1]
        self._ready.set()
        self.loop.run_forever()

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def call(self, fn, timeout: float = 10):
        """fn() on the server's event loop; its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.shutdown(grace=5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
