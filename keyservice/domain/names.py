"""Name rules for vaults and keys (Key Vault's: vault names are DNS labels,
key names are 1-127 alphanumerics and hyphens). Names end up in URLs, kids,
SQLite keys and audit entries, so anything else is refused up front. Always
`fullmatch`: with `match` and `$`, "cust\n" passed (`$` matches before a final
newline) and became a second vault beside "cust"."""
import re

from .errors import BadRequest

_VAULT = re.compile(r"[A-Za-z][A-Za-z0-9-]{1,22}[A-Za-z0-9]")
_KEY = re.compile(r"[A-Za-z0-9-]{1,127}")
_VERSION = re.compile(r"[0-9a-f]{32}")


def check_vault_name(name: str) -> str:
    if not isinstance(name, str) or not _VAULT.fullmatch(name) or "--" in name:
        raise BadRequest(f"Invalid vault name {name!r}: 3-24 characters, letters, digits and "
                         "hyphens, starting with a letter, not ending with a hyphen")
    return name


# Vault names only the `platform` role may create: the disk platform's own vault is
# "nbd-platform" (nbdserver/platform/service.py PLATFORM_VAULT). Names are global, so an
# identity that took the name first would hold the key of every platform-managed disk.
# Compared case-insensitively: a look-alike name must not be taken either.
DEFAULT_RESERVED_PREFIXES = ("nbd-platform",)


def reserved_prefix(name: str, prefixes) -> str | None:
    """The reserved prefix `name` starts with, if any."""
    return next((p for p in prefixes if name.lower().startswith(p.lower())), None)


def check_key_name(name: str) -> str:
    if not isinstance(name, str) or not _KEY.fullmatch(name):
        raise BadRequest(f"Invalid key name {name!r}: 1-127 letters, digits and hyphens")
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise BadRequest(f"Invalid key version {version!r}: 32 lowercase hex digits")
    return version
