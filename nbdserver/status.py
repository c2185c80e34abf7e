"""`nbdserver status`: is the server ready, and if not, why (as `vault status` answers).

One authenticated call (`GET /status`: the `/readyz` report plus where clients reach
the disks), printed like every command's answer (`--output`, `--query`); exit status 1
(a check found a fault) when the server is not ready, so a script can test it; an
unreachable API fails as every command does.
"""

from __future__ import annotations

import sys

import click

from daemonkit.clicommand import emit
from daemonkit.cliout import EXIT_REFUSED

from .client import api


@click.command()
def status():
    """Readiness, key service reachability and grace left, disks locked and attached."""
    report = api("GET", "/status")
    emit(report)
    if not report.get("ready"):
        sys.exit(EXIT_REFUSED)
