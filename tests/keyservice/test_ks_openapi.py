"""The key service's OpenAPI document is generated (keyservice/api/openapi.py) from the
route table and the request models the handlers validate with; these tests keep the
committed keyservice/openapi.json equal to a fresh one and complete, and check what the
models enforce on the real daemon."""

import json

import pytest
from aiohttp import web

from daemonkit.openapi import MissingOperation, document, dumps
from keyservice.api import openapi
from keyservice.api.app import make_app


def test_the_committed_document_is_the_generated_one():
    assert openapi.PATH.read_text() == dumps(openapi.build()), \
        "keyservice/openapi.json is stale: run python -m keyservice.api.openapi"


def test_every_route_of_the_app_is_in_the_document():
    doc = json.loads(openapi.PATH.read_text())
    routes = [r for r in make_app(service=None).router.routes() if r.method != "HEAD"]
    assert len(routes) > 50
    for route in routes:
        op = doc["paths"].get(route.resource.canonical, {}).get(route.method.lower())
        assert op is not None, (route.method, route.resource.canonical)
        assert op["operationId"] == route.name


def test_a_route_without_an_operation_cannot_be_documented():
    app = make_app(service=None)

    async def handler(request):
        return web.Response()

    app.router.add_get("/undocumented", handler, name="Undocumented")
    with pytest.raises(MissingOperation, match="/undocumented"):
        document(openapi.API, app, openapi._operation_of, lambda route: route.name or "")


def test_request_bodies_point_at_models_in_the_document():
    doc = openapi.build()
    bodies = {op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
              for path in doc["paths"].values() for op in path.values()
              if "application/json" in op.get("requestBody", {}).get("content", {})}
    assert {"KeyCreate", "KeyImport", "KeyUpdate", "KeyOperation", "VaultCreate", "PolicySet",
            "IdentityCreate", "TokenRequest"} <= bodies
    assert bodies <= set(doc["components"]["schemas"])
    # Attributes refuse unknown names; the rest of Key Vault's bodies ignore them.
    assert doc["components"]["schemas"]["KeyAttributesIn"]["additionalProperties"] is False
    assert "additionalProperties" not in doc["components"]["schemas"]["KeyCreate"]


def test_every_bad_field_is_named_in_one_answer(daemon):
    status, body = daemon.http("POST", "/vaults", {"location": 5, "enablePurgeProtection": "yes"})
    assert status == 400, body
    message = body["error"]["message"]
    assert body["error"]["code"] == "BadParameter"
    for words in ("'name' is required", "'location' must be of type string",
                  "'subscription' is required", "'enablePurgeProtection' must be of type boolean"):
        assert words in message, message


def test_nested_fields_are_checked_by_type(daemon, vault):
    status, body = daemon.http("PUT", f"/vaults/{vault}/keys/k", {"key": {"kty": "RSA", "n": 5}})
    assert status == 400 and "'key.n' must be of type string" in body["error"]["message"], body
    status, body = daemon.http("PUT", f"/vaults/{vault}/accessPolicies/someone",
                               {"permissions": {"keys": "all"}})
    assert status == 400 and "'permissions.keys' must be of type array" in body["error"]["message"], body


def test_a_refused_body_never_repeats_its_values(daemon, vault):
    """pydantic's own error text quotes the input: a DEK or a client secret must not come
    back in the answer or reach the log when a body is refused."""
    secret = "Zm9yYmlkZGVuLXNlY3JldC12YWx1ZQ"
    cases = [("POST", f"/vaults/{vault}/keys/k/wrapkey", {"value": [secret], "alg": {"x": secret}}),
             ("POST", "/oauth2/token", {"client_id": "a", "client_secret": {"s": secret}}),
             ("POST", "/identities", {"displayName": [secret]})]
    for method, path, payload in cases:
        status, body = daemon.http(method, path, payload)
        assert status == 400, body
        assert secret not in json.dumps(body)
    assert secret not in daemon.stderr()
