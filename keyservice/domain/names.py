"""Name rules for vaults and keys (Key Vault's: vault names are DNS labels,
key names are 1-127 alphanumerics and hyphens). Names end up in URLs, kids,
SQLite keys and audit entries, so anything else is refused up front."""
import re

from .errors import BadRequest

_VAULT = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,22}[A-Za-z0-9]$")
_KEY = re.compile(r"^[A-Za-z0-9-]{1,127}$")
_VERSION = re.compile(r"^[0-9a-f]{32}$")


def check_vault_name(name: str) -> str:
    if not isinstance(name, str) or not _VAULT.match(name) or "--" in name:
        raise BadRequest(f"Invalid vault name {name!r}: 3-24 characters, letters, digits and "
                         "hyphens, starting with a letter, not ending with a hyphen")
    return name


def check_key_name(name: str) -> str:
    if not isinstance(name, str) or not _KEY.match(name):
        raise BadRequest(f"Invalid key name {name!r}: 1-127 letters, digits and hyphens")
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise BadRequest(f"Invalid key version {version!r}: 32 lowercase hex digits")
    return version
