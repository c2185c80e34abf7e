"""Records of the disk platform and their named states.

A volume is a disk, a snapshot or an image: all three are encrypted files with their own
key envelope, and differ only in what may be done with them (only disks are served).

Persisted states (`VolumeState`): CREATING while its data is being written (a row left in
this state by a crash is removed with its file at the next start), READY afterwards.
Serving state of a disk is not persisted: it is its export's state (available, or locked
because its key is revoked or unreachable), derived again at every start.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit

from .errors import BadRequest

PLATFORM_KEY = "platform"  # the `des` of a volume under the platform-managed key
# A disk's cache mode (backend.py, like qemu's cache=): `none` is O_DIRECT on its file.
# Kept in `Volume.extra["cache"]`; a disk without one follows `nbdserver serve --cache`.
CACHE_MODES = ("none", "writeback")

# An encryption set's type (Azure's `encryptionType`). A set of the double type gives each
# of its disks two DEKs: one wrapped by its key (the customer's, as a CMK disk), one by the
# platform key, and every sector encrypted under both (crypto/double.py).
CUSTOMER_KEY = "EncryptionAtRestWithCustomerKey"
PLATFORM_AND_CUSTOMER_KEYS = "EncryptionAtRestWithPlatformAndCustomerKeys"
PLATFORM_KEY_TYPE = "EncryptionAtRestWithPlatformKey"  # a volume under PLATFORM_KEY: no set
SET_TYPES = (CUSTOMER_KEY, PLATFORM_AND_CUSTOMER_KEYS)


class VolumeKind(Enum):
    DISK = "disk"
    SNAPSHOT = "snapshot"
    IMAGE = "image"


class VolumeState(Enum):
    CREATING = "creating"
    READY = "ready"


@dataclass(frozen=True)
class KeyEnvelope:
    """A DEK wrapped by a key-service key: only this reaches storage."""

    kid: str  # with version: the exact key version that wrapped it
    alg: str
    wrapped: bytes

    def to_json(self) -> dict:
        return {"kid": self.kid, "alg": self.alg,
                "value": base64.urlsafe_b64encode(self.wrapped).rstrip(b"=").decode()}


@dataclass
class EncryptionSet:
    name: str
    subscription: str
    location: str
    key_url: str  # kid with or without version
    identity_object_id: str
    identity_sealed: bytes  # the identity's credential, sealed under the platform master key
    allow_cross_subscription: bool = False
    created: float = 0.0
    # Automatic rotation (Azure's rotationToLatestKeyVersionEnabled): follow the key's
    # latest version, re-wrapping every volume's DEK to it (`auto_rotation`).
    auto_rotate: bool = False
    active_key_url: str | None = None  # kid with version: what the last rotation wrapped with
    last_key_rotation: float | None = None  # when the last rotation (manual or automatic) ended
    rotation_error: dict | None = None  # why the last automatic attempt failed: code, message, time
    encryption_type: str = CUSTOMER_KEY  # one of SET_TYPES

    @property
    def double(self) -> bool:
        return self.encryption_type == PLATFORM_AND_CUSTOMER_KEYS


@dataclass
class Volume:
    name: str
    kind: VolumeKind
    size: int
    subscription: str
    location: str
    des: str  # an encryption set's name, or PLATFORM_KEY
    envelope: KeyEnvelope
    path: str
    state: VolumeState = VolumeState.READY
    source: str | None = None  # "snapshot:NAME", "image:NAME", "disk:NAME"
    gallery: str | None = None
    created: float = 0.0
    extra: dict = field(default_factory=dict)
    # Double encryption: the platform DEK's envelope (`envelope` is the customer DEK's,
    # wrapped by the set's key, so rotation and revocation see it as a CMK disk's).
    platform_envelope: KeyEnvelope | None = None

    @property
    def customer_managed(self) -> bool:
        return self.des != PLATFORM_KEY

    @property
    def double(self) -> bool:
        return self.platform_envelope is not None

    @property
    def encryption_type(self) -> str:
        if self.double:
            return PLATFORM_AND_CUSTOMER_KEYS
        return CUSTOMER_KEY if self.customer_managed else PLATFORM_KEY_TYPE

    @property
    def cache(self) -> str | None:
        """The disk's own cache mode, or None: the server's default."""
        return self.extra.get("cache")


# Matched whole (fullmatch): `$` would also match before a trailing newline.
_KID = re.compile(r"(?P<base>https?://[^/\s]+)/vaults/(?P<vault>[^/\s]+)/keys/(?P<key>[^/\s]+)(?:/(?P<version>[^/\s]+))?/?")


@dataclass(frozen=True)
class KeyUrl:
    base: str
    vault: str
    key: str
    version: str | None

    @classmethod
    def parse(cls, url: str) -> KeyUrl:
        m = _KID.fullmatch(url) if isinstance(url, str) else None
        if not m:
            raise BadRequest(f"not a key URL: {url!r} "
                             "(expected {base}/vaults/{vault}/keys/{name}[/{version}])")
        return cls(m["base"], m["vault"], m["key"], m["version"])

    @property
    def versionless(self) -> str:
        return f"{self.base}/vaults/{self.vault}/keys/{self.key}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_key_url(url, keyservice_url: str, vault_domain: str | None):
    """A key URL as the platform keeps it: the path form on its own key service.

    Key Vault's host form, `https://{vault}.{domain}[:port]/keys/{name}[/{version}]` (what
    the Azure SDKs and tools print, docs/azure-clients.md), names the same key when its
    domain is the key service's vault domain (`serve --keyservice-vault-domain`) and its
    scheme and port are the key service's: it is rewritten to
    `{keyservice_url}/vaults/{vault}/keys/...`, so everything after (claims, rotation,
    events, the kids the service returns) sees one form. A host-form URL on another
    port or scheme names another service and is refused; anything else is left to
    KeyUrl.parse."""
    if not isinstance(url, str) or not vault_domain or "://" not in url:
        return url
    parts = urlsplit(url)
    label, dot, domain = (parts.hostname or "").partition(".")
    if not dot or domain.lower() != vault_domain.lower().strip("."):
        return url
    # urlsplit lowers the host; vault names are not case-folded, so "Prod" would name the
    # vault "prod", perhaps another tenant's: a label with capitals is refused.
    raw_label = parts.netloc.rpartition("@")[2].partition(".")[0]
    if raw_label != label:
        raise BadRequest(f"key URL {url!r}: a vault's host name is lower case; for a vault "
                         "named with capitals use the path form {base}/vaults/{vault}/keys/...")
    path = [p for p in parts.path.split("/") if p]
    if path[:1] != ["keys"] or len(path) not in (2, 3) or parts.query or parts.fragment:
        raise BadRequest(f"not a key URL: {url!r} (expected https://{{vault}}.{vault_domain}"
                         "/keys/{name}[/{version}] or {base}/vaults/{vault}/keys/{name}[/{version}])")
    ks = urlsplit(keyservice_url)
    try:
        same = (parts.scheme == ks.scheme and (parts.port or _DEFAULT_PORTS.get(parts.scheme))
                == (ks.port or _DEFAULT_PORTS.get(ks.scheme)))
    except ValueError:  # a port that is not a number
        same = False
    if not same:
        raise BadRequest(f"key URL {url!r} is not on this platform's key service ({keyservice_url})")
    return f"{keyservice_url.rstrip('/')}/vaults/{label}/keys/" + "/".join(path[1:])


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")  # fullmatch: `data1\n` is not `data1`


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequest(f"invalid {kind} name {name!r}: 1-80 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def check_cache(value) -> str | None:
    if value is not None and value not in CACHE_MODES:
        raise BadRequest(f"cache must be one of {', '.join(CACHE_MODES)}, not {value!r}")
    return value


SIZE_FORMS = ("bytes (4096 multiples), 10G or 10GiB (binary, 1024-based), 10GB (decimal, "
              "1000-based), 1.5G; units K M G T P")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGTP])(i?B)?)?\s*", re.I)
_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
SECTOR = 4096
MAX_SIZE = 1 << 50


def parse_size(value) -> int:
    """Bytes from an int or a string: `10G` and `10GiB` are binary (the dm/LVM habit),
    `10GB` decimal (the disk vendors' and Azure's), `1.5G` a fraction of the unit. A size
    given with a unit is rounded up to whole 4096-byte sectors (10GB is no multiple of
    4096); a bare byte count must be one, as it says exactly what it wants."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest(f"size must be a number or a string; accepted forms: {SIZE_FORMS}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.fullmatch(value)
        if not m or (m[2] is None and "." in m[1]):
            raise BadRequest(f"invalid size {value!r}; accepted forms: {SIZE_FORMS}")
        number, unit, suffix = m[1], m[2], m[3]
        if unit is None:
            size = int(number)
        else:
            base = 1000 if suffix is not None and suffix.upper() == "B" else 1024
            size = _scaled(number, base ** _POWERS[unit.upper()])
            size = -(-size // SECTOR) * SECTOR
    if size <= 0 or size % SECTOR:
        raise BadRequest(f"size must be a positive multiple of {SECTOR} bytes, got {size}; "
                         f"accepted forms: {SIZE_FORMS}")
    if size > MAX_SIZE:
        raise BadRequest("size over 1 PiB")
    return size


def _scaled(number: str, unit: int) -> int:
    """`number` (decimal digits, maybe a fraction) times `unit`, rounded up, exactly."""
    whole, _, frac = number.partition(".")
    scale = 10 ** len(frac)
    return -(-(int(whole + frac) * unit) // scale)
