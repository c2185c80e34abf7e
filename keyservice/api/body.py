"""Request parsing shared by the handlers: JSON bodies and query parameters.

Bodies are capped at 1 MiB by aiohttp's `client_max_size` (set in app.py):
the largest legitimate body, an imported 4096-bit JWK, is a few KiB. Their shape is
checked against the models of `models.py` (`daemonkit.bodies`); a body that does not
fit is a 400 naming each field in question.
"""
import json
from typing import TypeVar

from aiohttp import web
from multidict import MultiDictProxy
from pydantic import BaseModel

from daemonkit.bodies import BodyError, parse

from ..domain.errors import BadRequest

MAX_BODY = 1024 * 1024
M = TypeVar("M", bound=BaseModel)


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


async def form_body(request: web.Request) -> MultiDictProxy:
    """An application/x-www-form-urlencoded body (the token endpoints). aiohttp decodes it
    in the charset the Content-Type names: bytes that are not text in it, or a charset
    with no codec, are the client's mistake (a 400), not an internal error."""
    try:
        return await request.post()
    except (UnicodeDecodeError, LookupError):
        # The charset is not quoted back: it is the client's header, whatever it holds.
        raise BadRequest("The form body is not text in the charset its Content-Type "
                         "names (UTF-8 if none)") from None


async def model_body(request: web.Request, model: type[M]) -> M:
    return validated(model, await json_body(request))


def validated(model: type[M], body: dict) -> M:
    """`body` as `model`, or a 400 (Key Vault's BadParameter) naming what is wrong."""
    try:
        return parse(model, body)
    except BodyError as e:
        raise BadRequest(e.message) from None


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
