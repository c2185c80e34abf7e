"""Which connections the NBD server takes, and for how long one may stay in the handshake.

Without bounds, anyone who reaches the port can open connections until the process runs
out of file descriptors; the platform then cannot reach the key service and a revoked
key keeps serving. So (all configurable, `ConnectionLimits`):

- a connection that has not reached transmission within `handshake_timeout` is closed
  (TLS handshake included): an idle socket costs the attacker nothing, us a descriptor;
- at most `max_per_peer` connections from one peer (an IPv4 address, an IPv6 /64, which
  one host can hold whole), so a flood from one place leaves room for the others;
- at most `max_connections` in total, and never more than the process's descriptor
  limit less `fd_reserve`: the descriptors the disks' files, the key service's HTTP
  connections and the API need are never taken by NBD clients.

A connection over a cap is accepted and closed at once (the client sees EOF before the
greeting and can retry), rather than left in the listen backlog where it would wait
silently and fill the backlog for everyone.
"""

from __future__ import annotations

import ipaddress
import resource
from dataclasses import dataclass, field

from .budget import default_limit
from .protocol.constants import MAX_BLOCK_SIZE


@dataclass(frozen=True)
class ConnectionLimits:
    # A multi-conn client opens a few connections per disk (nbd-client -C, nbdcopy 4,
    # qemu), and one host may attach dozens of disks: 1024 from one peer. The total stays
    # far below a systemd service's descriptor limit (524288) while being generous.
    max_connections: int = 4096
    max_per_peer: int = 1024
    # Real clients finish the handshake in milliseconds, a TLS one in well under a second.
    handshake_timeout: float = 10.0
    # Disk files, key-service and API sockets, logs: what the daemon itself needs.
    fd_reserve: int = 256
    # Bytes of READ buffers and unsent replies over all connections (nbdserver/budget.py).
    buffer_budget: int = field(default_factory=default_limit)

    def __post_init__(self):
        if self.max_connections < 1 or self.max_per_peer < 1:
            raise ValueError("connection caps must be at least 1")
        if not self.handshake_timeout > 0:
            raise ValueError("the handshake timeout must be positive")
        if self.fd_reserve < 0:
            raise ValueError("the descriptor reserve cannot be negative")
        if self.buffer_budget < MAX_BLOCK_SIZE:
            raise ValueError(f"the buffer budget must be at least {MAX_BLOCK_SIZE >> 20} MiB")


def peer_key(peer) -> str:
    """What a per-peer cap counts: the address, or its /64 for IPv6."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return str(host)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Admission:
    """Counts admitted connections, in total and per peer; `admit` says why not."""

    def __init__(self, limits: ConnectionLimits, nofile: int | None = None):
        self.limits = limits
        nofile = descriptor_limit() if nofile is None else nofile
        if nofile == resource.RLIM_INFINITY:
            self.max_total = limits.max_connections
        else:
            self.max_total = max(1, min(limits.max_connections, nofile - limits.fd_reserve))
        self.total = 0
        self._per_peer: dict[str, int] = {}

    def admit(self, key: str) -> str | None:
        """Count a new connection from `key` and return None, or return why it is refused."""
        if self.total >= self.max_total:
            return f"{self.total} connections open, the most this server takes"
        n = self._per_peer.get(key, 0)
        if n >= self.limits.max_per_peer:
            return f"{n} connections open from {key}, the most one peer may have"
        self.total += 1
        self._per_peer[key] = n + 1
        return None

    def release(self, key: str) -> None:
        self.total -= 1
        n = self._per_peer.get(key, 0) - 1
        if n > 0:
            self._per_peer[key] = n
        else:
            self._per_peer.pop(key, None)

    def from_peer(self, key: str) -> int:
        return self._per_peer.get(key, 0)
