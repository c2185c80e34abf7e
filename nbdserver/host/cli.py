"""`nbdserver attach | detach | attachments`: parse, call `attach.Host`, print JSON.

Refusals (`HostError`) print `error: MESSAGE` on stderr and exit 1, like the other
client commands. The NBD address comes from the API's GET /info unless --nbd is given.
"""

from __future__ import annotations

import json

import click

from ..client import api
from .attach import Host, Via
from .errors import HostError


class HostRefusal(click.ClickException):
    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def _call(fn):
    try:
        return fn()
    except HostError as e:
        raise HostRefusal(e.message) from None


def _out(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _nbd_address(given: str | None) -> str:
    if given:
        return given
    return api("GET", "/info")["nbd"]


@click.command()
@click.argument("disk")
@click.option("--via", type=click.Choice([v.value for v in Via]), default=Via.NBD.value,
              show_default=True, help="nbd: the kernel driver (nbd-client); fuse: nbdfuse + a loop device")
@click.option("--device", help="/dev/nbdN to use (--via nbd); default: the first free one")
@click.option("--connections", type=int, help="NBD connections (more than 1 only with multi-conn)")
@click.option("--nbd", "nbd_address", help="HOST:PORT of the NBD server; default: GET /info of the API")
@click.option("--tls-dir", type=click.Path(file_okay=False),
              help="NBD over TLS: ca-cert.pem, client-cert.pem, client-key.pem (nbdserver tls init)")
@click.option("--dry-run", is_flag=True, help="print the nbd-client command line, change nothing")
def attach(disk, via, device, connections, nbd_address, tls_dir, dry_run):
    """Attach DISK as a block device on this host; prints the device."""
    _out(_call(lambda: Host().attach(disk, _nbd_address(nbd_address), Via(via), device=device,
                                     connections=connections, dry_run=dry_run, tls_dir=tls_dir)))


@click.command()
@click.argument("target")
def detach(target):
    """Detach TARGET: /dev/nbdN, /dev/loopN of a fuse attachment, or the disk's name."""
    _out(_call(lambda: Host().detach(target)))


@click.command()
def attachments():
    """List this host's attachments (kernel NBD devices and fuse attachments)."""
    _out(_call(lambda: Host().attachments()))
