"""`/readyz`: whether this nbdserver can do its job now, and why not.

Ready means: the platform's state is open and not shutting down, and the key service
is reachable, or has been away for less than the grace period (disks keep serving on
the keys they hold until then: docs/platform.md). Past the grace period disks are being
closed, so the server is not ready (503), whatever else works.

Locked disks do not make the server unready: a revoked key is its owner's decision, and
the server does exactly what it should with it. Their number is reported. Everything
here is read from state the daemon keeps anyway: a probe makes no call to the key
service, so probing cannot be used to flood it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .exports import ExportCatalog
from .platform.access import KeyAccess


def grace_remaining(access: KeyAccess) -> dict[str, float]:
    """Per key scope (encryption set, or the platform key) with disks: seconds left of the
    grace period since its last successful check (never below 0)."""
    now = access.clock()
    return {scope: max(0.0, access.grace - (now - access.last_ok.get(scope, now)))
            for scope in access.scopes()}


@dataclass
class Readiness:
    catalog: ExportCatalog
    access: KeyAccess
    stopping: bool = False

    def report(self) -> tuple[bool, dict]:
        access = self.access
        now = access.clock()
        remaining = grace_remaining(access)
        down_for = 0.0 if access.stream_connected else now - access.stream_down_since
        past_grace = any(left <= 0 for left in remaining.values()) or down_for >= access.grace
        exports = list(self.catalog)
        locked = sum(1 for e in exports if e.locked)
        problems = []
        if self.stopping:
            problems.append("shutting down")
        if past_grace:
            problems.append(f"key service unreachable for more than the {access.grace:.0f}s grace period")
        ready = not problems
        return ready, {
            "status": "ready" if ready else "not ready",
            "problems": problems,
            "keyService": {
                "streamConnected": access.stream_connected,
                "unreachableSeconds": round(down_for, 1),
                "graceSeconds": access.grace,
                "graceRemainingSeconds": round(min(remaining.values(), default=access.grace), 1),
            },
            "disks": len(exports),
            "lockedDisks": locked,
            "attachedDisks": sum(1 for e in exports if e.clients),
        }
