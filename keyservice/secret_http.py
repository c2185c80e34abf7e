"""One HTTP/1.1 exchange whose secret-bearing bytes live only in buffers we wipe.

wrapKey sends a DEK and unwrapKey answers one, base64url-encoded inside JSON. The general
client (aiohttp) would leave immutable copies of that text behind: the JSON body it
serialises, the `bytes` chunks its parser hands out, the `str` that `json.loads` returns.
Freed, those copies stay in the heap until reused, so "DEK wiped" would not be true of the
encoded forms. This exchange keeps them in `bytearray`s end to end:

- the request (line, headers and JSON body) is built in one bytearray, the base64url
  text of the secret written into it by `b64u_encode_into`;
- the response is received straight into one preallocated bytearray: the protocol is an
  `asyncio.BufferedProtocol`, so the event loop (and the TLS layer, which decrypts into
  the buffer it is given) reads into our buffer, not into a fresh `bytes`;
- the secret field is decoded from that buffer into a new bytearray (`b64u_decode`),
  then every buffer is zeroed, on success and on every error path.

The answer must carry a Content-Length (the key service's JSON answers do); one request
per connection (`Connection: close`). Everything that is not the secret (status, headers,
other JSON fields, error bodies) is ordinary text.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
from urllib.parse import urlsplit

from daemonkit.wipe import wipe as wipe  # the client's secret_http.wipe

MAX_RESPONSE = 64 * 1024  # a wrap/unwrap answer is well under 2 KiB; anything larger is refused

_B64U = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64_VALUES = {c: i for i, c in enumerate(_B64U)} | {ord("+"): 62, ord("/"): 63}


def b64u_encode_into(out: bytearray, data: bytes | bytearray) -> None:
    """Append base64url (RFC 4648 section 5, unpadded) of `data` to `out`.

    Byte by byte on purpose: every intermediate value stays below 256, and CPython keeps
    those ints as shared singletons, so no heap object ever holds a piece of the secret."""
    n = len(data)
    for i in range(0, n, 3):
        b0 = data[i]
        b1 = data[i + 1] if i + 1 < n else 0
        b2 = data[i + 2] if i + 2 < n else 0
        out.append(_B64U[b0 >> 2])
        out.append(_B64U[((b0 & 3) << 4) | (b1 >> 4)])
        if i + 1 < n:
            out.append(_B64U[((b1 & 15) << 2) | (b2 >> 6)])
        if i + 2 < n:
            out.append(_B64U[b2 & 63])


def b64u_decode(text: bytearray | memoryview) -> bytearray:
    """base64url or base64 (padding optional) -> a new bytearray; ValueError if malformed.
    Byte-sized intermediates only, as in `b64u_encode_into`."""
    end = len(text)
    while end and text[end - 1] == ord("="):
        end -= 1
    if end % 4 == 1:
        raise ValueError("truncated base64")
    out = bytearray()
    try:
        for i in range(0, end, 4):
            v0 = _B64_VALUES[text[i]]
            v1 = _B64_VALUES[text[i + 1]]
            out.append(((v0 << 2) & 255) | (v1 >> 4))
            if i + 2 < end:
                v2 = _B64_VALUES[text[i + 2]]
                out.append(((v1 & 15) << 4) | (v2 >> 2))
                if i + 3 < end:
                    out.append(((v2 & 3) << 6) | _B64_VALUES[text[i + 3]])
    except KeyError:
        wipe(out)
        raise ValueError("not base64") from None
    return out


class _Exchange(asyncio.BufferedProtocol):
    """Receives one response into `buf`; `done` resolves with the body's slice."""

    def __init__(self, buf: bytearray):
        self.buf = buf
        self.n = 0
        self.head: tuple[int, int] | None = None  # (end of headers, content length)
        self.status = 0
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.n >= len(self.buf):
            self._fail(ValueError(f"response larger than {len(self.buf)} bytes"))
            return memoryview(bytearray(1))  # a sink; the connection is being closed
        return memoryview(self.buf)[self.n:]

    def buffer_updated(self, nbytes: int) -> None:
        self.n += nbytes
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n", 0, self.n)
            if end < 0:
                return
            try:
                self.head = self._parse_head(end)
            except ValueError as e:
                self._fail(e)
                return
        start, length = self.head
        if length >= 0 and self.n >= start + length:
            self._finish(start, start + length)

    def eof_received(self) -> bool:
        if self.head is not None and self.head[1] < 0:
            self._finish(self.head[0], self.n)
        return False

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection closed before the answer: {exc!r}"))

    def _parse_head(self, end: int) -> tuple[int, int]:
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")  # no secret in headers
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
        self.status = int(parts[1])
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding" and value.strip().lower() != "identity":
                raise ValueError("a chunked answer is not supported here")
        return end + 4, length

    def _finish(self, start: int, stop: int) -> None:
        if not self.done.done():
            self.done.set_result((start, stop))
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


async def post_secret(url: str, token: str, fields: dict, secret_field: str,
                      secret: bytes | bytearray | None, *, answer_field: str | None,
                      ssl: ssl_module.SSLContext | None, timeout: float
                      ) -> tuple[int, dict, bytearray | None]:
    """POST `fields` plus `secret_field` = base64url(secret) as JSON to `url`. Returns the
    status, the answer's JSON without `answer_field`, and `answer_field` decoded (or None).

    OSError / asyncio.TimeoutError / ConnectionError / ValueError go to the caller."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    body = bytearray(json.dumps(fields, separators=(",", ":"))[:-1].encode())
    if secret is not None:
        body += b',"%s":"' % secret_field.encode()
        b64u_encode_into(body, secret)
        body += b'"'
    body += b"}"
    request = bytearray(
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nAccept: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    request += body
    wipe(body)
    answer = bytearray(MAX_RESPONSE)
    transport = None
    try:
        async with asyncio.timeout(timeout):
            loop = asyncio.get_running_loop()
            use_ssl = ssl if parts.scheme == "https" else None
            if parts.scheme == "https" and use_ssl is None:
                use_ssl = ssl_module.create_default_context()
            transport, proto = await loop.create_connection(
                lambda: _Exchange(answer), host, port, ssl=use_ssl,
                server_hostname=host if use_ssl else None)
            transport.write(request)
            start, stop = await proto.done
        return proto.status, *_split_answer(answer, start, stop, answer_field)
    finally:
        if transport is not None:
            transport.abort()
        wipe(request)
        wipe(answer)


def _string_value_at(buf: bytearray, start: int, stop: int, name: bytes) -> int:
    """Where the string value of JSON member `name` begins (after its quote), or -1.
    The key service's answers are flat objects, so the first match is the member."""
    at = buf.find(name, start, stop)
    if at < 0:
        return -1
    i = at + len(name)
    while i < stop and buf[i] in b" \t\r\n":
        i += 1
    if i >= stop or buf[i] != ord(":"):
        return -1
    i += 1
    while i < stop and buf[i] in b" \t\r\n":
        i += 1
    return i + 1 if i < stop and buf[i] == ord('"') else -1


def _split_answer(answer: bytearray, start: int, stop: int, field: str | None
                  ) -> tuple[dict, bytearray | None]:
    """The JSON answer in answer[start:stop] -> (its other fields, `field` decoded).
    The field's text is blanked in the buffer before the rest is parsed as a str."""
    secret = None
    if field is not None:
        lo = _string_value_at(answer, start, stop, b'"%s"' % field.encode())
        if lo >= 0:
            hi = answer.find(b'"', lo, stop)
            if hi < 0:
                raise ValueError("the answer's JSON is cut short")
            view = memoryview(answer)[lo:hi]
            try:
                secret = b64u_decode(view)
            finally:
                view[:] = b"A" * (hi - lo)  # still valid JSON, no longer the secret
                view.release()
    try:
        rest = json.loads(bytes(answer[start:stop]) or b"null")
    except ValueError:
        rest = None
    if not isinstance(rest, dict):
        rest = {"_raw": bytes(answer[start:min(stop, start + 200)]).decode(errors="replace")}
    rest.pop(field, None)
    return rest, secret
