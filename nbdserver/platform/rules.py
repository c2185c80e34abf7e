"""The reference design's rules for customer-managed keys, one function each.

Each refusal is a `RuleViolation` whose message says what was refused and names the rule,
so an operator can look it up in docs/platform.md ("Rules").
"""

from __future__ import annotations

from .errors import RuleViolation
from .model import PLATFORM_KEY, EncryptionSet, Volume


def vault_fit_for_des(vault: dict, vault_name: str, location: str, subscription: str,
                      allow_cross_subscription: bool) -> None:
    """A vault can hold an encryption set's key only with soft delete and purge protection
    (a deleted key must stay recoverable, or the data is gone), in the set's location,
    and in its subscription unless cross-subscription use was explicitly allowed."""
    if not vault.get("softDeleteEnabled", True) or not vault.get("softDeleteRetentionInDays"):
        raise RuleViolation("vault-soft-delete",
                            f"key vault {vault_name!r} does not have soft delete enabled")
    if not vault.get("enablePurgeProtection"):
        raise RuleViolation("vault-purge-protection",
                            f"key vault {vault_name!r} does not have purge protection enabled; "
                            "enable it before using its keys for disk encryption")
    if vault.get("location") != location:
        raise RuleViolation("vault-same-location",
                            f"key vault {vault_name!r} is in location {vault.get('location')!r}, "
                            f"the encryption set in {location!r}; they must be the same")
    if vault.get("subscription") != subscription and not allow_cross_subscription:
        raise RuleViolation("vault-same-subscription",
                            f"key vault {vault_name!r} is in subscription {vault.get('subscription')!r}, "
                            f"the encryption set in {subscription!r}; allow cross-subscription use "
                            "explicitly to proceed")


def cmk_source(src: Volume, des: str | None, subscription: str | None) -> None:
    """A disk from a customer-managed snapshot or image keeps its key and subscription."""
    if des and des != src.des:
        raise RuleViolation("cmk-source-same-key",
                            f"{src.kind.value} {src.name!r} is encrypted with encryption set "
                            f"{src.des!r}; a disk made from it must use the same one")
    if subscription and subscription != src.subscription:
        raise RuleViolation("cmk-same-subscription",
                            f"{src.kind.value} {src.name!r} is in subscription {src.subscription!r}; "
                            "a disk made from a customer-managed source must be in the same one")


def same_subscription_as_des(des: EncryptionSet, subscription: str | None) -> None:
    if subscription and subscription != des.subscription:
        raise RuleViolation("cmk-same-subscription",
                            f"encryption set {des.name!r} is in subscription {des.subscription!r}; "
                            f"a disk under it cannot be in {subscription!r}")


def no_subscription_move(v: Volume, target: EncryptionSet) -> None:
    """Customer-managed disks, snapshots and images cannot move to another subscription."""
    if v.subscription != target.subscription:
        raise RuleViolation("cmk-no-subscription-move",
                            f"{v.kind.value} {v.name!r} is in subscription {v.subscription!r} and "
                            f"encryption set {target.name!r} in {target.subscription!r}; customer-"
                            "managed volumes cannot move to another subscription")


def image_shareable(v: Volume) -> None:
    if v.customer_managed:
        raise RuleViolation("cmk-image-no-gallery",
                            f"image {v.name!r} is encrypted with a customer-managed key "
                            f"(encryption set {v.des!r}) and cannot be shared to a gallery")


def same_layers_move(v: Volume, target: str, target_double: bool) -> None:
    """A move re-wraps a DEK; it cannot add or take away a layer of encryption, which
    means rewriting every sector. A double-encrypted disk moves only to another
    double-encryption set (its customer DEK re-wrapped, its platform DEK kept), and a
    single one only to the platform key or a customer-key set."""
    if v.double != target_double:
        to = "the platform-managed key" if target == PLATFORM_KEY else f"encryption set {target!r}"
        raise RuleViolation("double-same-layers",
                            f"{v.kind.value} {v.name!r} is encrypted {'twice' if v.double else 'once'} "
                            f"and {to} encrypts {'twice' if target_double else 'once'}; a move only "
                            "re-wraps keys. To change, snapshot the disk and make a disk from the "
                            "snapshot under the target (where the source's rules allow)")
