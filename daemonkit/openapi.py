"""OpenAPI 3.1 documents made from an aiohttp application's routes and a table of operations.

Each daemon keeps a table: for every route, what it does (`Operation`: summary, the
request model, the answer's model, query parameters). `document()` walks the app's route
table, so a route without an entry is an error, not a gap in the document, and takes
every schema from the pydantic models the handlers validate with, so the document cannot
say one thing while the code does another. The committed documents are compared with a
fresh one by the tests (`python -m keyservice.api.openapi`, `python -m nbdserver.openapi`
write them). OpenAPI 3.1 because its schemas are JSON Schema 2020-12, which is what
pydantic writes (a nullable field is `anyOf [..., {"type": "null"}]`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"
METHODS = ("get", "put", "post", "patch", "delete")


@dataclass(frozen=True)
class Query:
    name: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    description: str | None = None
    required: bool = False


@dataclass(frozen=True)
class Answer:
    """One response: a JSON body of `model` (None: no body or not JSON), its headers."""
    description: str
    model: type[BaseModel] | None = None
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    media_type: str = "application/json"


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    body_media_type: str = "application/json"
    answers: Mapping[int, Answer] = field(default_factory=lambda: {200: Answer("Success")})
    query: tuple[Query, ...] = ()
    description: str | None = None
    public: bool = False  # no bearer token
    errors: bool = True  # the API's error answers (`Api.error_statuses`) apply


@dataclass(frozen=True)
class Api:
    title: str
    version: str
    description: str
    error_model: type[BaseModel]  # every 4xx of the API answers in this shape
    error_statuses: tuple[int, ...]
    models: tuple[type[BaseModel], ...] = ()  # listed even where no operation names them


class MissingOperation(LookupError):
    """A route of the app has no entry in the table."""


def document(api: Api, app: web.Application, operation_of: Callable[[web.AbstractRoute], Operation],
             operation_id: Callable[[web.AbstractRoute], str]) -> dict[str, Any]:
    ops: list[tuple[str, str, str, Operation]] = []
    for route in app.router.routes():
        method = route.method.lower()
        if method not in METHODS:
            continue  # HEAD is implied by GET
        path = route.resource.canonical if route.resource is not None else ""
        try:
            op = operation_of(route)
        except KeyError:
            raise MissingOperation(f"{route.method} {path} ({route.name}) has no OpenAPI "
                                   "operation: add one to the API's table") from None
        ops.append((path, method, operation_id(route), op))
    schemas = _schemas(api, [op for *_, op in ops])
    paths: dict[str, dict[str, Any]] = {}
    for path, method, op_id, op in ops:
        paths.setdefault(path, {})[method] = _operation(api, path, op_id, op)
    return {
        "openapi": "3.1.0",
        "info": {"title": api.title, "version": api.version, "description": api.description},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "Error", "content": {"application/json": {
                "schema": {"$ref": REF.format(model=api.error_model.__name__)}}}}},
            "schemas": schemas,
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def dumps(doc: Mapping[str, Any]) -> str:
    """The committed form: stable, one key a line, a final newline."""
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def write_or_check(argv: list[str], path: Path, build: Callable[[], Mapping[str, Any]],
                   module: str) -> int:
    """`python -m MODULE [--check]`: write the document to `path`, or with `--check` exit 1
    (saying what to run) when the committed one differs from a fresh one."""
    text = dumps(build())
    if argv[1:] == ["--check"]:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run python -m {module}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


def _schemas(api: Api, ops: Iterable[Operation]) -> dict[str, Any]:
    models: dict[type[BaseModel], None] = dict.fromkeys([api.error_model, *api.models])
    for op in ops:
        if op.body is not None:
            models[op.body] = None
        for answer in op.answers.values():
            if answer.model is not None:
                models[answer.model] = None
    names = [m.__name__ for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name: {sorted(names)}")
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    return dict(sorted(top.get("$defs", {}).items()))


def _operation(api: Api, path: str, op_id: str, op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op_id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        out["description"] = op.description
    if op.public:
        out["security"] = []
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in re.findall(r"{(\w+)}", path)]
    for q in op.query:
        param: dict[str, Any] = {"name": q.name, "in": "query", "required": q.required,
                                 "schema": dict(q.schema)}
        if q.description:
            param["description"] = q.description
        params.append(param)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {op.body_media_type: {
            "schema": {"$ref": REF.format(model=op.body.__name__)}}}}
    responses: dict[str, Any] = {}
    for status, answer in sorted(op.answers.items()):
        responses[str(status)] = _answer(answer)
    if op.errors:
        for status in api.error_statuses:
            responses.setdefault(str(status), {"$ref": "#/components/responses/Error"})
    out["responses"] = dict(sorted(responses.items()))
    return out


def _answer(answer: Answer) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    if answer.headers:
        out["headers"] = {name: {"schema": dict(schema)} for name, schema in answer.headers.items()}
    if answer.model is not None:
        out["content"] = {answer.media_type: {"schema": {"$ref": REF.format(model=answer.model.__name__)}}}
    return out
