"""What the HTTP clients of both daemons (`keyservice.client`, `nbdserver.client`, and so
both CLIs) say when a call fails, so that the two speak alike whatever library carries
the request (aiohttp for the key service's client, which the platform shares; urllib for
the platform API's synchronous one).

`describe(e)`: why a call got no answer, in an operator's words ("connection refused",
"its TLS certificate is not trusted: ..."), never a repr. `error_of(status, data)`: the
code and message of an error answer in the shape both APIs use, `{"error": {"code",
"message"}}`, or of whatever else came back (a proxy's HTML page).
"""

from __future__ import annotations

import json
import os
import socket
import ssl

import aiohttp

BODY_SHOWN = 200  # characters of a non-JSON error answer quoted in the message


def describe(e: BaseException) -> str:
    """Why a call got no answer. The cause chain is searched for what the system said (an
    errno's text, a resolver's message, TLS's reason; urllib's URLError keeps it in
    `reason`, aiohttp's connector errors in `os_error`); failing that, the exception's
    class name in words. aiohttp's `ClientConnectorError(ConnectionKey(host=..., ssl=...))`
    reached logs, the CLIs and NBD clients as a repr before this."""
    seen: BaseException | None = e
    while seen is not None:
        inner = getattr(seen, "os_error", None) or seen
        reason = getattr(inner, "reason", None)
        if isinstance(reason, BaseException):  # urllib.error.URLError
            inner = reason
        if isinstance(inner, TimeoutError):
            return "no answer in time"
        if isinstance(inner, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not trusted: {inner.verify_message}"
        if isinstance(inner, ssl.SSLError):
            return f"TLS failed: {inner.reason or 'handshake error'}"
        if isinstance(inner, OSError) and (inner.strerror or inner.errno):
            # The errno's own text: asyncio's strerror is "Connect call failed (addr)".
            # A resolver's errors (gaierror) are not errnos: their text is theirs.
            if inner.errno and inner.errno > 0 and not isinstance(inner, socket.gaierror):
                text = os.strerror(inner.errno)
            else:
                text = inner.strerror or "failed"
            return text[:1].lower() + text[1:]
        if isinstance(reason, str) and reason:  # URLError("unknown url type: ...")
            return reason
        seen = seen.__cause__ or seen.__context__
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the connection closed before an answer"
    name = type(e).__name__.removesuffix("Error")
    words = "".join(f" {c.lower()}" if c.isupper() else c for c in name).strip()
    return words or "failed"


def error_of(status: int, data: bytes, reason: str = "") -> tuple[str, str]:
    """(code, message) of an error answer: the API's own, else the HTTP status and the head
    of what came back, so that a proxy's or a load balancer's page is still readable."""
    try:
        body = json.loads(data) if data else None
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err.get("code") or "Unknown"), err["message"]
    head = data[:BODY_SHOWN].decode(errors="replace").strip()
    return "HttpError", f"HTTP {status}{' ' + reason if reason else ''}" + (f": {head}" if head else "")
