"""Change events: what a subscriber (the disk platform) is told.

Events are persisted with a monotonically increasing `seq` in the same
transaction as the change they describe, so a subscriber can resume after a
restart of either side with `since=<last seq seen>`.
"""
from dataclasses import asdict, dataclass

TYPES = ("key.created", "key.rotated", "key.updated", "key.disabled", "key.enabled", "key.expired",
         "key.deleted", "key.recovered", "key.purged", "policy.changed", "policy.deleted",
         "vault.deleted", "vault.recovered", "vault.purged")


@dataclass
class Event:
    type: str
    vault: str
    time: float
    key: str | None = None
    version: str | None = None
    kid: str | None = None
    objectId: str | None = None
    seq: int | None = None
    tenantId: str | None = None  # the vault's tenant: whose subscribers see the event

    def to_dict(self) -> dict:
        return asdict(self)
