"""The `nbd-client` command lines, built and checked without touching the machine.

Pure: the caller probes the export (size, multi-conn) and the kernel; this module only
decides the argv or refuses. nbd-client 3.24 syntax (`nbd-client -h`):
`nbd-client -N NAME HOST PORT /dev/nbdX [-b BS] [-C N] [-p]`, and `nbd-client -d /dev/nbdX`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import Refused

NBD_DEVICE = re.compile(r"^/dev/nbd(0|[1-9][0-9]{0,3})$")
# Disk names of the platform (nbdserver/platform/model.py NAME): also safe in paths and URIs.
DISK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
# 4096: the disks' encryption sector (docs/format.md); a smaller logical block would make
# every kernel write of 512 bytes a read-modify-write of a 4096-byte sector on the server.
BLOCK_SIZE = 4096
# The kernel driver allows more, but each connection is a server worker's socket; beyond
# 16 nothing is gained on the hosts we target and a typo (-C 400) would exhaust the server.
MAX_CONNECTIONS = 16


@dataclass(frozen=True)
class ExportProbe:
    """What the server said about the export during a handshake."""

    size: int
    multi_conn: bool


def check_disk_name(name: str) -> str:
    if not DISK_NAME.match(name or ""):
        raise Refused(f"invalid disk name {name!r}: 1-80 letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit")
    return name


def check_nbd_device(device: str) -> str:
    if not NBD_DEVICE.match(device or ""):
        raise Refused(f"{device!r} is not an NBD device: give /dev/nbdN (N a number)")
    return device


def check_connections(requested: int | None, probe: ExportProbe) -> int:
    """How many connections to open: several only where the server promises multi-conn.

    NBD_FLAG_CAN_MULTI_CONN (doc/proto.md) is the server's promise that a flush on one
    connection covers writes completed on every other; without it a kernel spreading
    writes over several sockets could lose data on a flush, so we refuse."""
    if requested is None:
        return 1
    if not 1 <= requested <= MAX_CONNECTIONS:
        raise Refused(f"--connections must be between 1 and {MAX_CONNECTIONS}, not {requested}")
    if requested > 1 and not probe.multi_conn:
        raise Refused(f"the server does not offer multi-conn for this export, so --connections "
                      f"{requested} could lose flushed writes; use --connections 1")
    return requested


# The names `nbdserver tls init` writes, which are also libnbd's (tls-certificates=DIR).
TLS_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def attach_argv(host: str, port: int, device: str, disk: str, connections: int,
                *, persist: bool = True, tls_dir: str | None = None) -> list[str]:
    """nbd-client's argv to connect DEVICE to export DISK at HOST:PORT.

    With TLS_DIR: -x (TLS required), the CA that signed the server's certificate, and
    the client certificate; nbd-client checks the server's name against HOST."""
    check_nbd_device(device)
    check_disk_name(disk)
    if not 1 <= port <= 65535:
        raise Refused(f"invalid NBD port {port}")
    argv = ["nbd-client", "-N", disk, host, str(port), device, "-b", str(BLOCK_SIZE)]
    if connections > 1:
        argv += ["-C", str(connections)]
    if tls_dir is not None:
        ca, cert, key = (f"{tls_dir.rstrip('/')}/{f}" for f in TLS_FILES)
        # The long option forms: Debian's nbd-client refuses the short -A/-F/-K its
        # --help lists ("unrecognized option").
        argv += ["-x", "-cacertfile", ca, "-certfile", cert, "-keyfile", key]
    if persist:
        # -p: reconnect when the connection drops (server restart, network blip) instead of
        # failing every I/O; the kernel queues requests meanwhile.
        argv.append("-p")
    return argv


def detach_argv(device: str) -> list[str]:
    return ["nbd-client", "-d", check_nbd_device(device)]
