"""Key scopes: which key service client and which key a volume's scope uses.

A scope is an encryption set's name, or `PLATFORM_KEY` for the platform-managed key.
The platform's own identity (`client`) serves `PLATFORM_KEY`; each set has its own
managed identity, whose sealed credential is opened the first time the set is used and
whose client is kept until the set is deleted (`forget`) or the platform stops.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from keyservice.client import Credential, KeyServiceClient

from .errors import NotFound
from .model import PLATFORM_KEY, EncryptionSet

if TYPE_CHECKING:
    from .sealing import Sealer
    from .state import State


class KeyScopes:
    """Reads sets from `state`, opens their credentials with `sealer`, and connects as
    them to `keyservice_url` (with `ssl`); `client` is the platform's own."""

    def __init__(self, state: State, sealer: Sealer, client: KeyServiceClient, *,
                 keyservice_url: str, ssl=None):
        self.state = state
        self.sealer = sealer
        self.client = client
        self.keyservice_url = keyservice_url
        self.ssl = ssl
        # Known once the platform started (made at its first start, see service.py).
        self.platform_key_url: str | None = state.get_config("platform_key_url")
        self._des_clients: dict[str, KeyServiceClient] = {}

    def client_for(self, scope: str) -> KeyServiceClient:
        if scope == PLATFORM_KEY:
            return self.client
        c = self._des_clients.get(scope)
        if c is None:
            des = self.des(scope)
            cred = Credential(**json.loads(self.sealer.open(des.identity_sealed, f"des:{des.name}")))
            c = self._des_clients[scope] = KeyServiceClient(self.keyservice_url, cred, ssl=self.ssl)
        return c

    def key_url_for(self, scope: str) -> str:
        if scope != PLATFORM_KEY:
            return self.des(scope).key_url
        if self.platform_key_url is None:
            raise RuntimeError("the platform key is known only once start() has run")
        return self.platform_key_url

    def des(self, name: str) -> EncryptionSet:
        """The encryption set `name`, or NotFound (a 404 at the API)."""
        des = self.state.get_des(name)
        if des is None:
            raise NotFound(f"encryption set {name!r} not found")
        return des

    async def forget(self, name: str) -> None:
        """A deleted set: its identity's client closes."""
        c = self._des_clients.pop(name, None)
        if c is not None:
            await c.close()

    async def close(self) -> None:
        """Every client, the platform's own last."""
        for c in list(self._des_clients.values()) + [self.client]:
            await c.close()
        self._des_clients.clear()
