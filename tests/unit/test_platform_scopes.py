"""`KeyScopes` alone, from fakes of the state and sealer it declares."""

from __future__ import annotations

import asyncio

import pytest

from nbdserver.platform.errors import NotFound
from nbdserver.platform.model import PLATFORM_KEY
from nbdserver.platform.scopes import KeyScopes


class FakeState:
    def __init__(self, config=None):
        self.config = config or {}

    def get_config(self, name):
        return self.config.get(name)

    def get_des(self, name):
        return None


class FakeClient:
    closed = False

    async def close(self):
        self.closed = True


def test_the_platform_scope_is_the_platform_client_and_key():
    client = FakeClient()
    scopes = KeyScopes(FakeState({"platform_key_url": "https://ks/keys/k"}), sealer=None,
                       client=client, keyservice_url="https://ks")
    assert scopes.client_for(PLATFORM_KEY) is client
    assert scopes.key_url_for(PLATFORM_KEY) == "https://ks/keys/k"
    asyncio.run(scopes.close())
    assert client.closed


def test_an_unknown_set_is_not_found_and_the_key_unknown_before_start():
    scopes = KeyScopes(FakeState(), sealer=None, client=FakeClient(), keyservice_url="https://ks")
    with pytest.raises(NotFound, match="encryption set 'nope' not found"):
        scopes.client_for("nope")
    with pytest.raises(RuntimeError, match="start"):
        scopes.key_url_for(PLATFORM_KEY)
