"""Request bodies of both HTTP APIs: a decoded JSON object checked against a pydantic model.

The models (`keyservice/api/models.py`, `nbdserver/apimodels.py`) say the shape of a
body: which fields, their JSON types, which are required, and whether unknown fields are
refused. The rules about values (a key size, a name's pattern, a retention range) stay in
each daemon's domain, where every caller meets them, not only HTTP.

`RequestModel` validates strictly: JSON has its own types, so "30" is not an integer and
true is not 1 (pydantic's lax mode would convert both). A JSON null is "not given",
as the hand-written parsers read it before, and a required field that is null is missing.

A failure is a `BodyError` whose message names every bad field and what it must be.
Never the value itself: a body may carry a client secret or a DEK, and pydantic's own
`str(ValidationError)` quotes the input, so it is never shown, logged or chained.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


def _absent_is_null(schema: dict[str, Any], cls: Any) -> None:
    """In the JSON schema, an optional field (default None) is shown as its own type, not
    `anyOf [type, null]`: null means "not given", which leaving it out says already, and
    an enum or item schema of the field then applies to the type it was written for."""
    for name, prop in schema.get("properties", {}).items():
        choices = prop.get("anyOf")
        spec = cls.model_fields.get(name)
        if spec is not None and spec.default is None and choices and len(choices) == 2 \
                and {"type": "null"} in choices:
            rest = {k: v for k, v in prop.items() if k != "anyOf" and (k, v) != ("default", None)}
            schema["properties"][name] = {**next(c for c in choices if c != {"type": "null"}), **rest}


class RequestModel(BaseModel):
    """A request body. Unknown fields are ignored unless a model says `extra="forbid"`."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True,
                              json_schema_extra=_absent_is_null)


class BodyError(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# What a field must be, by pydantic's error type (pydantic.dev/errors/validation_errors).
_MUST_BE = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "string_type": "of type string", "bool_type": "of type boolean",
    "dict_type": "of type object", "model_type": "of type object",
    "model_attributes_type": "of type object", "list_type": "of type array",
}


def parse(model: type[M], data: Any) -> M:
    """`data` (a decoded JSON object) as `model`, or BodyError naming what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=True)
    raise BodyError(describe(errors))  # raised outside the except: nothing chains the input


def describe(errors: list[Any]) -> str:
    """One message for all of them; a field that may be one of several types (a union)
    gets one phrase: "'size' must be an integer or of type string"."""
    must: dict[str, list[str]] = {}
    problems: dict[str, None] = {}  # ordered, without repeats
    for err in errors:
        where, kind = _location(err["loc"]), err["type"]
        if kind == "missing" or (kind in _MUST_BE and err.get("input", ...) is None):
            problems[f"'{where}' is required"] = None
        elif kind == "extra_forbidden":
            problems[f"'{where}' is not a known field"] = None
        elif kind in _MUST_BE:
            if where not in must:
                must[where] = []
                problems[where] = None  # its place in the message
            if _MUST_BE[kind] not in must[where]:
                must[where].append(_MUST_BE[kind])
        else:  # ranges, lengths: pydantic's message quotes the bound, never the input
            problems[f"'{where}': {err['msg']}"] = None
    return "; ".join(f"'{p}' must be {' or '.join(must[p])}" if p in must else p for p in problems)


def _location(loc: tuple[str | int, ...]) -> str:
    """("attributes", "exp") -> attributes.exp; ("roles", 0) -> roles[0]. A union's
    member names (pydantic puts "int", "str" in the path) are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "str", "float", "bool", "list", "dict") or "[" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out or "body"
