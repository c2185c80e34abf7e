"""Logging for the aiohttp servers of both daemons (the key service's API and nbdserver's
platform API)."""

from __future__ import annotations

import logging

FIELD_LIMIT = 256  # characters of one logged value


def escape(value, limit: int = FIELD_LIMIT) -> str:
    """A client-supplied value made safe for a one-line log record: control and other
    unprintable characters backslash-escaped as repr() does (a %0A in a URL path is a
    real newline once decoded, and would forge a log line), and capped with a marker."""
    text = str(value)
    if text.isprintable() and "\\" not in text:
        out = text
    else:
        out = "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)
    if len(out) > limit:
        out = f"{out[:limit]}...[{len(out) - limit} more]"
    return out


class MalformedRequestLog(logging.Filter):
    """aiohttp answers an HTTP request it cannot parse (a NUL in a header, a bad request
    line, a bad Content-Length) with 400 itself, then logs it at ERROR with a traceback.
    A client's malformed bytes are not our error: one INFO line, no traceback (found by
    schemathesis). Install on the "aiohttp.server" logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and getattr(exc, "code", None) == 400 and hasattr(exc, "message"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed HTTP request answered 400: %r", (str(exc.message)[:200],)
            record.exc_info, record.exc_text = None, None
        return True
