"""Serve files as NBD exports without the disk platform: the benchmark baseline.

    python -m nbdserver.baseline --listen 127.0.0.1:10809 NAME=PATH[,size=BYTES][,ro][,key=KEYFILE] ...

Not a product command: the product (`nbdserver serve`) only serves the platform's
encrypted disks. This runner exists so the protocol and the plain I/O path can be tested
and benchmarked on their own, and so the encryption layer can be measured against the
same server without it (`key=` wraps the file in XtsLayer with a 64-byte key file).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from .backend import FileBackend
from .exports import Export, ExportCatalog
from .runtime import configure_logging, parse_hostport, run, sd_notify
from .server import NbdServer

log = logging.getLogger("nbdserver.baseline")


def parse_export(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition("=")
    path, *opts = rest.split(",")
    out = {"path": path, "size": None, "readonly": False, "key": None}
    for o in opts:
        k, _, v = o.partition("=")
        if k == "size":
            out["size"] = parse_size(v)
        elif k == "ro":
            out["readonly"] = True
        elif k == "key":
            out["key"] = v
        else:
            raise SystemExit(f"unknown export option {k!r}")
    return name, out


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def open_backend(opts: dict):
    backend = FileBackend(opts["path"], size=opts["size"], readonly=opts["readonly"])
    if opts["key"]:
        from .crypto import XtsLayer
        with open(opts["key"], "rb") as f:
            key = bytearray(f.read())
        backend = XtsLayer(backend, key)
    return backend


async def serve(listen: str, specs: list[str], workers: int, stop: asyncio.Event) -> None:
    catalog = ExportCatalog()
    for spec in specs:
        name, opts = parse_export(spec)
        catalog.add(Export(name, open_backend(opts), readonly=opts["readonly"],
                           description=f"file {opts['path']}"))
        if catalog.default is None:
            catalog.default = name
    server = NbdServer(catalog, workers=workers)
    host, port = parse_hostport(listen, 10809)
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
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("exports", nargs="+", metavar="NAME=PATH[,size=..][,ro][,key=FILE]")
    args = ap.parse_args(argv)
    configure_logging(args.log_level)
    run(lambda stop: serve(args.listen, args.exports, args.workers, stop))


if __name__ == "__main__":
    main()
