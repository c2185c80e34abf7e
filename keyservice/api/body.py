"""Request parsing shared by the handlers: JSON bodies and query parameters.

Bodies are capped at 1 MiB by aiohttp's `client_max_size` (set in app.py):
the largest legitimate body, an imported 4096-bit JWK, is a few KiB.
"""
import json

from aiohttp import web

from ..domain.errors import BadRequest

MAX_BODY = 1024 * 1024


async def json_body(request: web.Request) -> dict:
    raw = await request.read()  # raises HTTPRequestEntityTooLarge above client_max_size
    if not raw:
        raise BadRequest("A JSON object body is required")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    return body


def field(body: dict, name: str, kind, *, required: bool = False, default=None):
    """One typed field; a wrong type is a 400 naming the field and the type."""
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"'{name}' is required")
        return default
    value = body[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"'{name}' must be an integer")
    if kind is not int and not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be of type {_TYPE_NAMES.get(kind, kind.__name__)}")
    return value


_TYPE_NAMES = {str: "string", bool: "boolean", dict: "object", list: "array"}


def query_int(request: web.Request, name: str, default: int | None, lo: int = 0, hi: int = 2**62):
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter '{name}' must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter '{name}' must be between {lo} and {hi}")
    return value
