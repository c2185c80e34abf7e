"""Vaults and their lifecycle.

States: ACTIVE -> (delete) -> SOFT_DELETED -> (recover) -> ACTIVE
                                          \\-> (purge, or retention ends) -> gone
`softDeleteRetentionInDays` (7..90, Key Vault's bounds) is fixed at creation;
`enablePurgeProtection` may be turned on later but never off: that is the whole
point of it (a compromised owner cannot destroy keys before retention ends).
"""
import enum
from dataclasses import dataclass

from .errors import BadRequest, Conflict, Forbidden

DAY = 86400.0
MIN_RETENTION, MAX_RETENTION, DEFAULT_RETENTION = 7, 90, 90


class VaultState(enum.Enum):
    ACTIVE = "active"
    SOFT_DELETED = "softDeleted"


@dataclass
class Vault:
    name: str
    tenant_id: str
    subscription: str
    location: str
    retention_days: int
    purge_protection: bool
    owner: str
    created: float
    deleted_at: float | None = None
    scheduled_purge: float | None = None
    # The vault's identity (names are reused after a purge) and its audit chain: the id
    # for vaults made since ids exist, the name for older ones (their chain was already
    # keyed by name, and the chain's name is inside every entry's MAC).
    id: str = ""
    audit_chain: str = ""

    @property
    def state(self) -> VaultState:
        return VaultState.ACTIVE if self.deleted_at is None else VaultState.SOFT_DELETED

    def soft_delete(self, now: float) -> None:
        if self.state is not VaultState.ACTIVE:
            raise Conflict(f"Vault '{self.name}' is already deleted")
        self.deleted_at = now
        self.scheduled_purge = now + self.retention_days * DAY

    def recover(self) -> None:
        if self.state is not VaultState.SOFT_DELETED:
            raise Conflict(f"Vault '{self.name}' is not deleted")
        self.deleted_at = self.scheduled_purge = None

    def check_purge(self, now: float) -> None:
        if self.state is not VaultState.SOFT_DELETED:
            raise Conflict(f"Vault '{self.name}' must be deleted before it can be purged")
        # A soft-deleted vault always has its purge date; without one, refuse.
        if self.purge_protection and (self.scheduled_purge is None or now < self.scheduled_purge):
            raise Forbidden(f"Vault '{self.name}' has purge protection enabled and cannot be "
                            "purged before its scheduled purge date", permission="purge",
                            inner="PurgeProtected")

    def enable_purge_protection(self, value) -> None:
        if not isinstance(value, bool):
            raise BadRequest("enablePurgeProtection must be a boolean")
        if self.purge_protection and not value:
            raise BadRequest("Purge protection cannot be disabled once enabled")
        self.purge_protection = self.purge_protection or value

    @property
    def recovery_level(self) -> str:
        """Key Vault's names: "Customized" when retention is under the default 90 days,
        "+Purgeable" unless purge protection is on."""
        level = "Recoverable" if self.retention_days == MAX_RETENTION else "CustomizedRecoverable"
        return level if self.purge_protection else level + "+Purgeable"


def check_retention(days) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not MIN_RETENTION <= days <= MAX_RETENTION:
        raise BadRequest(f"softDeleteRetentionInDays must be an integer between "
                         f"{MIN_RETENTION} and {MAX_RETENTION}")
    return days


def check_label(field: str, value) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 90 or not value.isprintable():
        raise BadRequest(f"{field} must be a printable string of 1-90 characters")
    return value
