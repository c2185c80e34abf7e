"""Keys, their versions and attributes, and the rules for using them.

A key is a name in a vault with an ordered list of versions; create, import
and rotate only ever add a version (the newest is "current"). Attributes
(enabled, nbf, exp, key_ops) belong to a version.

Key states:   ACTIVE -> (delete) -> SOFT_DELETED -> (recover) -> ACTIVE
                                               \\-> (purge, or retention ends) -> gone
A version may be used to wrap or unwrap only when the key is ACTIVE and the
version is enabled, not before `nbf`, not after `exp`, and lists the operation
in `key_ops`. Times are seconds since the epoch, as in Key Vault's attributes.
"""
import enum
import secrets
from dataclasses import dataclass, field

from .errors import BadRequest, Conflict, Forbidden, NotFound
from .vaults import DAY

KEY_OPS = ("wrapKey", "unwrapKey")  # the only operations this service implements
# A key-exchange key (BYOK, hsm_keys.py) has key_ops ["import"] and nothing else: it only
# unwraps key transfer blobs, in the token, and that is fixed when it is made.
IMPORT_OP = "import"


class KeyState(enum.Enum):
    ACTIVE = "active"
    SOFT_DELETED = "softDeleted"


@dataclass
class KeyVersion:
    version: str
    size: int
    public_der: bytes
    enabled: bool
    nbf: float | None
    exp: float | None
    key_ops: tuple[str, ...]
    created: float
    updated: float
    kty: str = "RSA"  # "RSA-HSM": the private key is in a PKCS#11 token (hsm_keys.py)

    def check_usable(self, op: str, now: float) -> None:
        if not self.enabled:
            raise Forbidden(f"Operation {op} is not allowed on a disabled key", inner="KeyDisabled")
        if self.nbf is not None and now < self.nbf:
            raise Forbidden(f"Operation {op} is not allowed on a key before its activation "
                            "date (nbf)", inner="KeyNotYetValid")
        if self.exp is not None and now >= self.exp:
            raise Forbidden(f"Operation {op} is not allowed on an expired key", inner="KeyExpired")
        if op not in self.key_ops:
            raise Forbidden(f"Operation {op} is not allowed by this key's key_ops",
                            inner="KeyOperationNotAllowed")


@dataclass
class Key:
    vault: str
    name: str
    created: float
    versions: list[KeyVersion] = field(default_factory=list)  # oldest first
    deleted_at: float | None = None
    scheduled_purge: float | None = None

    @property
    def state(self) -> KeyState:
        return KeyState.ACTIVE if self.deleted_at is None else KeyState.SOFT_DELETED

    @property
    def current(self) -> KeyVersion:
        return self.versions[-1]

    def version(self, version: str | None) -> KeyVersion:
        if not version:
            return self.current
        for v in self.versions:
            if v.version == version:
                return v
        raise NotFound(f"A key with (name/id) {self.name}/{version} was not found in this key vault",
                       code="KeyNotFound")

    def soft_delete(self, now: float, retention_days: int) -> None:
        self.deleted_at = now
        self.scheduled_purge = now + retention_days * DAY

    def recover(self) -> None:
        self.deleted_at = self.scheduled_purge = None

    def check_purge(self, now: float, purge_protection: bool) -> None:
        if purge_protection and (self.scheduled_purge is None or now < self.scheduled_purge):
            raise Forbidden(f"Key '{self.name}' is in a vault with purge protection enabled and "
                            "cannot be purged before its scheduled purge date", permission="purge",
                            inner="PurgeProtected")


def new_version_id() -> str:
    return secrets.token_hex(16)


def check_not_deleted_name(key: "Key | None", name: str) -> None:
    """Key Vault refuses to reuse the name of a soft-deleted key until it is recovered or purged."""
    if key is not None and key.state is KeyState.SOFT_DELETED:
        raise Conflict(f"Key {name} is currently in a deleted but recoverable state, and its "
                       "name cannot be reused; in this state, the key can only be recovered or purged.")


@dataclass
class Attributes:
    """Parsed, validated attribute changes; None means "leave as is"."""
    enabled: bool | None = None
    nbf: float | None = None
    exp: float | None = None
    key_ops: tuple[str, ...] | None = None
    clear_nbf: bool = False
    clear_exp: bool = False

    def apply(self, v: KeyVersion, now: float) -> None:
        nbf = None if self.clear_nbf else (self.nbf if self.nbf is not None else v.nbf)
        exp = None if self.clear_exp else (self.exp if self.exp is not None else v.exp)
        if nbf is not None and exp is not None and exp <= nbf:
            raise BadRequest("exp must be later than nbf")
        v.nbf, v.exp = nbf, exp
        if self.enabled is not None:
            v.enabled = self.enabled
        if self.key_ops is not None:
            v.key_ops = self.key_ops
        v.updated = now


def parse_attributes(attributes, key_ops) -> Attributes:
    out = Attributes()
    if attributes is not None:
        if not isinstance(attributes, dict):
            raise BadRequest("attributes must be an object")
        unknown = set(attributes) - {"enabled", "nbf", "exp", "created", "updated", "recoveryLevel",
                                     "recoverableDays"}
        if unknown:
            raise BadRequest(f"Unknown attribute(s): {', '.join(sorted(unknown))}")
        if "enabled" in attributes:
            if not isinstance(attributes["enabled"], bool):
                raise BadRequest("attributes.enabled must be a boolean")
            out.enabled = attributes["enabled"]
        for name in ("nbf", "exp"):
            if name in attributes:
                value = attributes[name]
                if value is None:
                    setattr(out, "clear_" + name, True)
                elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**40:
                    raise BadRequest(f"attributes.{name} must be seconds since the epoch or null")
                else:
                    setattr(out, name, float(value))
    if key_ops is not None:
        allowed = (*KEY_OPS, IMPORT_OP)
        if not isinstance(key_ops, list) or any(op not in allowed for op in key_ops):
            raise BadRequest(f"key_ops must be a list drawn from {', '.join(allowed)}")
        out.key_ops = tuple(op for op in allowed if op in key_ops)
    return out
