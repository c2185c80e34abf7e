"""The directory: users, service principals and managed identities.

An identity authenticates with a client id and a client secret (shown once,
stored only as a SHA-256 digest: the secret is 256 random bits, so a plain
digest is not brute-forceable and needs no slow KDF). Roles: `admin` manages the
directory of its own tenant (an admin of the service's home tenant may also found
a new tenant); `platform` (the disk platform) may create managed identities without
roles and follow the change stream.

An identity is enabled or disabled. `generation` is stamped into every token it
gets and bumped when it is disabled or its secret is reset, so tokens issued
before either stop working at once (tokens are checked against the directory on
every call: a primary-key lookup).
"""
import base64
import hashlib
import hmac
import uuid
from dataclasses import dataclass, field

from daemonkit.fips import random_bytes

from .errors import BadRequest, Forbidden

TYPES = ("user", "servicePrincipal", "managedIdentity")
ROLES = ("admin", "platform")


@dataclass
class Identity:
    object_id: str
    client_id: str
    tenant_id: str
    display_name: str
    type: str
    roles: tuple[str, ...]
    secret_hash: bytes
    created: float
    disabled: bool = False
    generation: int = 0

    def secret_matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.secret_hash, _digest(secret))


@dataclass(frozen=True)
class Caller:
    """Who is calling, as proven by a verified bearer token."""
    object_id: str
    tenant_id: str
    roles: tuple[str, ...] = field(default=())
    generation: int = 0  # the identity's generation when the token was issued
    audience: str | None = None  # the token's `aud`; None for tokens issued without one

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def is_platform(self) -> bool:
        return "platform" in self.roles


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def check_new_identity(caller: Caller, display_name, type_, roles, tenant_id) -> None:
    """The rules for who may create which identity; raises on refusal."""
    if not isinstance(display_name, str) or not 1 <= len(display_name) <= 256:
        raise BadRequest("displayName must be a string of 1-256 characters")
    if type_ not in TYPES:
        raise BadRequest(f"type must be one of {', '.join(TYPES)}")
    if not isinstance(roles, (list, tuple)) or any(r not in ROLES for r in roles):
        raise BadRequest(f"roles must be a list drawn from {', '.join(ROLES)}")
    if caller.is_admin:
        # Which tenants an admin may create identities in needs the directory: the service decides.
        if tenant_id is not None and (not isinstance(tenant_id, str) or not _is_uuid(tenant_id)):
            raise BadRequest("tenantId must be a UUID")
        return
    if caller.is_platform:
        # The platform creates one managed identity per disk encryption set; it must
        # not be able to mint identities that carry roles or live in another tenant.
        if type_ != "managedIdentity" or roles or tenant_id not in (None, caller.tenant_id):
            raise Forbidden("The platform role may only create managed identities without "
                            "roles in its own tenant", permission="identities/create")
        return
    raise Forbidden(f"The identity '{caller.object_id}' may not create identities: "
                    "the admin or platform role is required", permission="identities/create")


def new_identity(display_name: str, type_: str, roles, tenant_id: str, now: float) -> tuple[Identity, str]:
    secret = new_secret()
    ident = Identity(object_id=str(uuid.uuid4()), client_id=str(uuid.uuid4()), tenant_id=tenant_id,
                     display_name=display_name, type=type_, roles=tuple(dict.fromkeys(roles)),
                     secret_hash=_digest(secret), created=now)
    return ident, secret


def new_secret() -> str:
    # secrets.token_urlsafe's form, from the FIPS provider's DRBG in FIPS mode.
    return base64.urlsafe_b64encode(random_bytes(32)).rstrip(b"=").decode()


def reset_secret(ident: Identity) -> str:
    """A new secret; the old one and every token issued under it stop working."""
    secret = new_secret()
    ident.secret_hash = _digest(secret)
    ident.generation += 1
    return secret


def set_enabled(ident: Identity, enabled) -> None:
    if not isinstance(enabled, bool):
        raise BadRequest("enabled must be a boolean")
    if not enabled and not ident.disabled:
        ident.generation += 1  # its tokens die with the disable, and stay dead after enable
    ident.disabled = not enabled


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
        return True
    except ValueError:
        return False
