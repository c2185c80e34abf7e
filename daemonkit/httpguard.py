"""Slowloris protection for the aiohttp servers of both daemons (the key service's API and
nbdserver's platform API).

aiohttp bounds the idle time between requests (`keepalive_timeout`) but not the time a
client may take to send a request: 100 connections that each sent half a request line
stayed open for good, and nothing capped how many connections were open. Here:

- `RequestProgress` (pure: bytes in, phase out) follows where a connection's bytes are:
  between requests, in a request's headers, or in its body (Content-Length, or chunked up
  to its last chunk);
- `GuardedRunner` (a `web.AppRunner`) wraps every connection's protocol so that a request's
  headers must be complete within `header_timeout` of its first byte (a new connection:
  of its opening) and its body within `body_timeout` of its headers, else the connection
  is closed; a connection past `max_connections` is answered 503 and closed at once.
  A request being handled (a long change stream included) and an idle keep-alive
  connection are not timed here; aiohttp closes the latter after `idle_timeout`.

Deadlines run from the start of a phase, not from the last byte: a client dripping one
byte a second is closed like one that sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, fields
from typing import Any

from aiohttp import web

log = logging.getLogger("httpguard")

IDLE, HEADERS, BODY, CHUNKED = "idle", "headers", "body", "chunked"
MAX_HEAD = 64 * 1024  # header bytes kept for parsing; aiohttp refuses far smaller heads itself
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
         b"Content-Length: 36\r\n\r\ntoo many connections; retry shortly\n")


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0  # a 1 MiB body (the largest either API takes) at ~35 KB/s
    max_connections: int = 512  # well below the usual 1024 descriptors, leaving room for files
    idle_timeout: float = 75.0

    @classmethod
    def from_env(cls, prefix: str) -> HttpLimits:
        """`{prefix}_HEADER_TIMEOUT`, `_BODY_TIMEOUT`, `_MAX_CONNECTIONS`, `_IDLE_TIMEOUT`
        override the defaults (how tests and operators tune a daemon without a flag)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"{prefix}_{f.name.upper()}")
            if raw:
                kind = int if f.name == "max_connections" else float
                try:
                    value = kind(raw)
                except ValueError:
                    raise ValueError(f"{prefix}_{f.name.upper()} must be a number, not {raw!r}") from None
                if value <= 0:
                    raise ValueError(f"{prefix}_{f.name.upper()} must be positive")
                values[f.name] = value
        return cls(**values)


class RequestProgress:
    """Where an HTTP/1.1 connection's bytes are. `feed(data)` returns the phase after them
    and whether a new request started in them. Framing is read only as far as needed to
    find a request's end; malformed input is aiohttp's to refuse, and at worst ends a
    phase early, which starts the next phase's deadline."""

    def __init__(self):
        self.phase = HEADERS  # a new connection owes its first request's headers
        self._head = bytearray()
        self._left = 0  # body bytes still expected (BODY)
        self._tail = b""  # the last bytes seen of a chunked body

    def feed(self, data: bytes) -> tuple[str, bool]:
        started = False
        view = memoryview(data)
        while view:
            if self.phase == IDLE:
                self.phase, started = HEADERS, True
                self._head.clear()
            if self.phase == HEADERS:
                chunk = bytes(view[:max(0, MAX_HEAD - len(self._head))])
                start = max(0, len(self._head) - 3)
                self._head += chunk
                end = self._head.find(b"\r\n\r\n", start)
                if end < 0:  # all consumed (past MAX_HEAD unkept: aiohttp refuses such a head)
                    view = view[:0]
                    continue
                view = view[end + 4 - (len(self._head) - len(chunk)):]
                self._start_body(bytes(self._head[:end]))
            elif self.phase == BODY:
                n = min(self._left, len(view))
                self._left -= n
                view = view[n:]
                if not self._left:
                    self.phase = IDLE
            elif self.phase == CHUNKED:
                seen = self._tail + bytes(view)
                end = seen.find(b"0\r\n\r\n")
                if end < 0:
                    self._tail = seen[-5:]
                    view = view[:0]
                else:
                    view = view[max(0, end + 5 - len(self._tail)):]
                    self.phase, self._tail = IDLE, b""
        return self.phase, started

    def _start_body(self, head: bytes) -> None:
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = max(0, int(value.strip()))
                except ValueError:
                    length = 0
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            self.phase, self._tail = CHUNKED, b""
        elif length:
            self.phase, self._left = BODY, length
        else:
            self.phase = IDLE


class _GuardedProtocol(asyncio.Protocol):
    """Stands between the event loop and aiohttp's RequestHandler for one connection."""

    def __init__(self, guard: _GuardedServer, inner):
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._progress = RequestProgress()
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport) -> None:
        self._transport = transport
        if self._guard.open >= self._guard.limits.max_connections:
            log.warning("refusing a connection from %s: %d connections open (the cap)",
                        _peer(transport), self._guard.open)
            transport.write(_BUSY)
            transport.close()
            return
        self._guard.open += 1
        self._counted = True
        self._inner.connection_made(transport)
        self._arm(HEADERS)

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        before = self._progress.phase
        phase, started = self._progress.feed(data)
        if phase != before or started:
            self._arm(phase)
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received() if self._counted else None

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self._guard.open -= 1
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._counted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._counted:
            self._inner.resume_writing()

    def _arm(self, phase: str) -> None:
        self._disarm()
        limits = self._guard.limits
        timeout = {HEADERS: limits.header_timeout, BODY: limits.body_timeout,
                   CHUNKED: limits.body_timeout}.get(phase)
        if timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._expire, phase, timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, phase: str, timeout: float) -> None:
        self._timer = None
        what = "headers" if phase == HEADERS else "body"
        log.info("closing a connection from %s: request %s not complete within %g s",
                 _peer(self._transport), what, timeout)
        if self._transport is not None:  # abort: a client that does not read must not hold it open
            self._transport.abort()


def _peer(transport) -> str:
    peer = transport.get_extra_info("peername") if transport else None
    return f"{peer[0]}:{peer[1]}" if peer else "?"


class _GuardedServer:
    """aiohttp's `web.Server` (the protocol factory) with every protocol guarded."""

    def __init__(self, server: web.Server, limits: HttpLimits):
        self._server = server
        self.limits = limits
        self.open = 0

    def __call__(self) -> _GuardedProtocol:
        return _GuardedProtocol(self, self._server())

    def __getattr__(self, name):  # shutdown, pre_shutdown, connections, ...
        return getattr(self._server, name)


class GuardedRunner(web.AppRunner):
    """`web.AppRunner` whose sites serve through the guard; use it in place of AppRunner."""

    def __init__(self, app: web.Application, *, limits: HttpLimits = HttpLimits(), **kwargs):
        kwargs.setdefault("keepalive_timeout", limits.idle_timeout)
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self):
        return _GuardedServer(await super()._make_server(), self.limits)
