"""How a request names its vault, and the URLs the service hands back.

Two forms address the same vaults:
- path form, `{base}/vaults/{vault}/keys/...`: the service's own clients (the disk
  platform, the CLI) and every kid they hold;
- host form, `https://{vault}.{domain}[:port]/keys/...` with `serve --vault-domain
  DOMAIN`: Key Vault's own addressing, the only one the Azure SDKs accept (they take
  the vault from the host and allow no path before `/keys`).

A response's kids are in the form of its request, so each client gets identifiers it
can use where it is: a kid the platform stored keeps working, and an SDK never sees a
kid it refuses. Scheme and port of host-form URLs are those of `--base-url` (the
address clients use), never taken from a request's Host header.

The resource (token audience) of the host form is `{scheme}://{domain}[:port]`, as
Key Vault's is `https://vault.azure.net`: the SDKs check that a challenge's resource
is a parent domain of the vault's host, port included.
"""
from urllib.parse import urlsplit

from ..domain.names import _VAULT


class Addressing:
    def __init__(self, base_url: str, vault_domain: str | None = None):
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.scheme = parts.scheme or "https"
        default = {"https": 443, "http": 80}.get(self.scheme)
        self._port = "" if parts.port in (None, default) else f":{parts.port}"
        self.vault_domain = vault_domain.strip(".").lower() if vault_domain else None

    @property
    def resource(self) -> str:
        """What a challenge names as the resource, and what tokens are issued for."""
        if self.vault_domain:
            return f"{self.scheme}://{self.vault_domain}{self._port}"
        return self.base_url

    @property
    def audiences(self) -> tuple[str, ...]:
        """Token audiences this service accepts: the vault resource and its own URL."""
        return tuple(dict.fromkeys((self.resource, self.base_url)))

    @property
    def authority(self) -> str:
        """The token issuer's base (`authorization="{authority}/{tenant}"` in a challenge)."""
        return self.base_url

    def vault_of_host(self, host: str | None) -> str | None:
        """The vault a Host header names (`{vault}.{domain}[:port]`), or None."""
        if not self.vault_domain or not host:
            return None
        # DNS names are case-insensitive: a vault is reached in host form by its name in
        # lower case (a vault named with capitals is reachable in path form only).
        name = host.lower()
        if name.startswith("["):
            return None  # an IPv6 literal is no vault's name
        name = name.rpartition(":")[0] if ":" in name else name
        label, dot, rest = name.partition(".")
        if not dot or rest.rstrip(".") != self.vault_domain or not _VAULT.fullmatch(label) \
                or "--" in label:
            return None
        return label

    def vault_url(self, vault: str, host_form: bool) -> str:
        if host_form and self.vault_domain:
            return f"{self.scheme}://{vault}.{self.vault_domain}{self._port}"
        return f"{self.base_url}/vaults/{vault}"


def is_host_form(request) -> bool:
    """Host-form routes are registered under names ending in ".host" (keys.py)."""
    return (request.match_info.route.name or "").endswith(".host")


def vault_name(request) -> str:
    """The vault of a key call: from the path, else (host form) from the Host header."""
    return request.match_info.get("vault") or request["host_vault"]


def vault_url(request, vault: str) -> str:
    return request.app["addressing"].vault_url(vault, is_host_form(request))
