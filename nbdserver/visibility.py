"""What one NBD client may learn of the exports: the handshake's Catalog, per connection.

NBD has no authentication of its own: a client is anonymous unless it proved who it is
with a TLS client certificate the server verified (`--tls-verify-clients`). Disk names
and descriptions (which name the encryption set) are the tenants' business, and a
refusal's reason (which names the key) is the operator's, so:

- Refusals are one generic message whatever the cause (ExportCatalog.export); the cause
  is logged here, at a bounded rate, with the client's address.
- NBD_OPT_LIST is answered by policy (`ExportList`): `all` lists every export to anyone;
  `authenticated` only to clients with a verified certificate; `none` to nobody. A
  refused listing is NBD_REP_ERR_POLICY, the reply the spec names for a server that
  does not wish to reveal its exports (nbd-server's default too).
- Descriptions go to authenticated clients only, in listings and NBD_INFO_DESCRIPTION.

Every authenticated client sees every export: there is no per-identity export list
(nbd-server's authfile is by address, nbdkit's by filter); a TLS-PSK session counts as
anonymous here, as Python's ssl cannot tell us its identity.
"""

from __future__ import annotations

import dataclasses
import logging
from enum import Enum

from .loglimit import LogLimiter
from .protocol.constants import NBD_REP_ERR_POLICY
from .protocol.handshake import ExportInfo, ExportRefused

log = logging.getLogger("nbdserver.server")
limited_log = LogLimiter(log)


class ExportList(Enum):
    ALL = "all"
    AUTHENTICATED = "authenticated"
    NONE = "none"


class ClientView:
    """The catalog as one connection's client may see it."""

    def __init__(self, catalog, policy: ExportList = ExportList.ALL, peer=None):
        self._catalog = catalog
        self._policy = policy
        self.peer = peer
        self.identity: str | None = None  # set once a client certificate was verified

    def lookup(self, name: str) -> ExportInfo:
        try:
            info = self._catalog.lookup(name)
        except ExportRefused as e:
            if e.detail:
                limited_log.log(f"refused {self.peer and self.peer[0]}", logging.INFO,
                                "connection %s: export %r refused: %s", self.peer, name, e.detail)
            raise
        if self.identity is None and info.description:
            info = dataclasses.replace(info, description="")
        return info

    def listing(self) -> list[tuple[str, str]]:
        if self._policy is ExportList.NONE or (self._policy is ExportList.AUTHENTICATED
                                               and self.identity is None):
            raise ExportRefused(NBD_REP_ERR_POLICY, "this server does not list its exports")
        items = self._catalog.listing()
        if self.identity is None:
            items = [(name, "") for name, _ in items]
        return items
