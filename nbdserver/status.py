"""`nbdserver status`: is the server ready, and if not, why (as `vault status` answers).

One authenticated call (`GET /status`: the `/readyz` report plus where clients reach
the disks), printed as JSON; exit status 1 when the server is not ready, so a script
can test it (an unreachable API fails as every command does).
"""

from __future__ import annotations

import json
import sys

import click

from .client import api


@click.command()
def status():
    """Readiness, key service reachability and grace left, disks locked and attached."""
    report = api("GET", "/status")
    click.echo(json.dumps(report, indent=2, sort_keys=True))
    if not report.get("ready"):
        sys.exit(1)
