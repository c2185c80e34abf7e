"""Serve files as NBD exports without the disk platform: the benchmark baseline.

    python -m nbdserver.baseline --listen 127.0.0.1:10809 [--cache none|writeback] \
        NAME=PATH[,size=BYTES][,ro][,key=KEYFILE][,cache=none|writeback] ...

Not a product command: the product (`nbdserver serve`) only serves the platform's
encrypted disks. This runner exists so the protocol and the plain I/O path can be tested
and benchmarked on their own, and so the encryption layer can be measured against the
same server without it (`key=` wraps the file in XtsLayer with a 64-byte key file).
`--cache` is every export's cache mode unless its own `cache=` says otherwise (backend.py:
`none` is O_DIRECT); a file system that cannot do O_DIRECT fails the start with a message.
A PATH written `rbd:POOL/IMAGE` is a Ceph RBD image instead (nbdserver/rbdbackend.py),
reached with `--ceph-conf`, `--ceph-id` and `--ceph-keyring`; `size=` creates it if it
does not exist, and `key=` puts the same XtsLayer over it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from daemonkit.sdnotify import sd_notify

from .admission import ConnectionLimits
from .backend import CACHE_MODES, WRITEBACK, BlockBackend, FileSpec
from .budget import default_limit
from .exports import Export, ExportCatalog, ExportSource
from .iopool import IoPool
from .protocol.handshake import TlsMode
from .runtime import configure_logging, parse_hostport, run
from .server import NbdServer
from .tls import ServerTls, TlsConfigError, resolve_mode, server_context_for
from .visibility import ExportList

log = logging.getLogger("nbdserver.baseline")
RBD_SCHEME = "rbd:"  # rbdbackend.SCHEME, spelt here so a file export never imports librbd


def parse_export(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition("=")
    path, *opts = rest.split(",")
    out: dict[str, Any] = {"path": path, "size": None, "readonly": False, "key": None, "cache": None}
    for o in opts:
        k, _, v = o.partition("=")
        if k == "size":
            out["size"] = parse_size(v)
        elif k == "ro":
            out["readonly"] = True
        elif k == "key":
            out["key"] = v
        elif k == "cache":
            if v not in CACHE_MODES:
                raise SystemExit(f"export {name!r}: cache must be one of {', '.join(CACHE_MODES)}")
            out["cache"] = v
        else:
            raise SystemExit(f"unknown export option {k!r}")
    return name, out


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def file_spec(opts: dict, cache: str = WRITEBACK) -> FileSpec:
    """The export's disk as plain data (what an I/O worker process opens again)."""
    return FileSpec(opts["path"], size=opts["size"], readonly=opts["readonly"],
                    cache=opts["cache"] or cache, encrypted=bool(opts["key"]))


def open_backend(opts: dict, cache: str = WRITEBACK, ceph: dict | None = None
                 ) -> tuple[BlockBackend, ExportSource | None]:
    """The export's backend, and for a file how an I/O worker process opens it too (the
    key is the very bytearray the layer owns and wipes)."""
    from .crypto import open_disk
    if opts["path"].startswith(RBD_SCHEME):
        return open_rbd(opts, ceph), None
    key = None
    if opts["key"]:
        with open(opts["key"], "rb") as f:
            key = bytearray(f.read())
    spec = file_spec(opts, cache)
    return open_disk(spec, key), ExportSource(spec, key)


def open_rbd(opts: dict, ceph: dict | None) -> BlockBackend:
    """An export on RBD: the image, and XtsLayer over it with `key=` (as open_disk does
    for a file: the image then holds ciphertext only)."""
    from .crypto import XtsLayer
    from .rbdbackend import RbdSpec
    if not ceph:
        raise ValueError("an export on RBD needs --ceph-conf")
    if opts["cache"]:
        raise ValueError("cache= is for files; librbd's cache is always off (rbdbackend.py)")
    spec = RbdSpec.parse(opts["path"], size=opts["size"], readonly=opts["readonly"],
                         encrypted=bool(opts["key"]), standby=True, **ceph)
    key = None
    if opts["key"]:
        with open(opts["key"], "rb") as f:
            key = bytearray(f.read())
    try:
        lower = spec.open()
    except BaseException:
        if key is not None:  # not handed to a layer: wiped here (XtsLayer wipes its own)
            key[:] = bytes(len(key))
        raise
    if key is None:
        return lower
    try:
        return XtsLayer(lower, key)
    except BaseException:
        key[:] = bytes(len(key))
        lower.close()
        raise


async def serve(listen: str, specs: list[str], workers: int, stop: asyncio.Event, tls=None,
                limits=None, export_list=ExportList.ALL, cache: str = WRITEBACK,
                ceph: dict | None = None, io_processes: int = 1) -> None:
    catalog = ExportCatalog()
    for spec in specs:
        name, opts = parse_export(spec)
        try:
            backend, source = open_backend(opts, cache, ceph)
        except OSError as err:  # a file system without O_DIRECT, a bad path: say which export
            raise SystemExit(f"export {name!r}: {err.strerror or err}") from None
        except ValueError as err:  # an RBD export written wrong, or without its cluster
            raise SystemExit(f"export {name!r}: {err}") from None
        where = "RBD image" if opts["path"].startswith(RBD_SCHEME) else "file"
        export = Export(name, backend, readonly=opts["readonly"], description=f"{where} {opts['path']}")
        if source is not None:
            export.share(source)
        catalog.add(export)
        if catalog.default is None:
            catalog.default = name
    host, port = parse_hostport(listen, 10809)
    tls_mode, tls_context = tls if tls is not None else (TlsMode.OFF, None)
    server = NbdServer(catalog, workers=workers, tls_mode=tls_mode, tls_context=tls_context,
                       limits=limits, export_list=export_list)
    if io_processes > 1:  # as `nbdserver serve --io-processes` (nbdserver/iopool.py)
        server.handoff = IoPool(io_processes, catalog, admission=server.admission,
                                buffer_budget=server.limits.buffer_budget, threads=workers)
        server.handoff.start()
    addrs = await server.listen(host, port)
    log.info("serving %d export(s) on %s", len(specs), addrs)
    print(f"LISTENING {addrs[0][0]} {addrs[0][1]}", flush=True)
    sd_notify("READY=1")
    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("shutting down")
    await server.shutdown()
    for e in catalog:
        e.backend.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nbdserver.baseline", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:10809")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--io-processes", type=int, default=1,
                    help="processes serving plain-TCP connections (default 1: all in this one; "
                         "`nbdserver serve` defaults to one per core)")
    ap.add_argument("--cache", choices=CACHE_MODES, default=WRITEBACK,
                    help="every export's cache mode unless it says cache=: writeback (the page "
                         "cache) or none (O_DIRECT; docs/operations.md)")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--tls-mode", choices=["off", "optional", "required"],
                    help="default: required unless --listen is loopback (docs/tls.md)")
    ap.add_argument("--tls-dir", help="server-cert.pem, server-key.pem, ca-cert.pem")
    ap.add_argument("--tls-verify-clients", action="store_true",
                    help="require a client certificate signed by the directory's ca-cert.pem")
    ap.add_argument("--tls-psk-file", help="psktool-format identity:hexkey file (TLS-PSK)")
    add_limit_arguments(ap)
    ap.add_argument("--ceph-conf", help="ceph.conf of the cluster of the rbd:POOL/IMAGE exports")
    ap.add_argument("--ceph-id", default="admin", help="cephx client name, without client. (default admin)")
    ap.add_argument("--ceph-keyring", help="that client's keyring (default: what ceph.conf says)")
    ap.add_argument("--export-list", choices=[e.value for e in ExportList], default="all",
                    help="who may list the exports (default all: this runner serves test files)")
    ap.add_argument("exports", nargs="+", metavar="NAME=PATH[,size=..][,ro][,key=FILE][,cache=MODE]")
    args = ap.parse_args(argv)
    ceph = ({"conf": args.ceph_conf, "client_id": args.ceph_id, "keyring": args.ceph_keyring}
            if args.ceph_conf else None)
    configure_logging(args.log_level)
    mode = resolve_mode(args.tls_mode, parse_hostport(args.listen, 10809)[0])
    try:
        context = server_context_for(mode, ServerTls(args.tls_dir, args.tls_verify_clients,
                                                     args.tls_psk_file))
        limits = ConnectionLimits(args.max_connections, args.max_connections_per_peer,
                                  args.handshake_timeout, args.fd_reserve,
                                  (args.buffer_budget_mib << 20) if args.buffer_budget_mib
                                  else default_limit())
    except (TlsConfigError, ValueError) as e:
        ap.error(str(e))
    run(lambda stop: serve(args.listen, args.exports, args.workers, stop, tls=(mode, context),
                           limits=limits, export_list=ExportList(args.export_list),
                           cache=args.cache, ceph=ceph, io_processes=args.io_processes))


def add_limit_arguments(ap: argparse.ArgumentParser) -> None:
    """The connection limits (nbdserver/admission.py); the same as `nbdserver serve`'s."""
    d = ConnectionLimits()
    ap.add_argument("--max-connections", type=int, default=d.max_connections,
                    help="NBD connections in total (never more than RLIMIT_NOFILE less --fd-reserve)")
    ap.add_argument("--max-connections-per-peer", type=int, default=d.max_per_peer,
                    help="NBD connections from one address (IPv6: one /64)")
    ap.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout,
                    help="seconds a connection may take to reach transmission")
    ap.add_argument("--fd-reserve", type=int, default=d.fd_reserve,
                    help="file descriptors kept from NBD clients for the daemon's own use")
    ap.add_argument("--buffer-budget-mib", type=int, default=None,
                    help="MiB of read buffers and unsent replies over all connections "
                         "(default: 1 GiB or a quarter of RAM)")


if __name__ == "__main__":
    main()
