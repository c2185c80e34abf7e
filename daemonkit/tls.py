"""The TLS rules both daemons apply: what counts as loopback, and the error for a TLS
setting that cannot work.

Plain traffic (HTTP to the key service, NBD) is allowed by default only on a loopback
address, where nobody else is on the path; each daemon decides what else it needs.
"""

from __future__ import annotations

import ipaddress


class TlsConfigError(Exception):
    """TLS settings that cannot work, or plain traffic where it is refused: the message
    says which file or option and why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name, or a wildcard such as 0.0.0.0 or ""
