"""attach, detach, attachments: the operations, over the two ways (nbd, fuse).

Each operation checks everything it can before it changes the machine (names, kernel
support, tools, the export answering a handshake), and undoes its own partial work when
a later step fails, so a refused or failed attach leaves nothing behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import asdict
from enum import Enum

from ..runtime import parse_hostport
from . import fuse, kernel
from .errors import ExportUnreachable, MissingSupport, NotAttached, Refused, ToolFailed
from .nbdclient import (
    BLOCK_SIZE,
    NBD_DEVICE,
    TLS_FILES,
    ExportProbe,
    attach_argv,
    check_connections,
    check_disk_name,
    detach_argv,
)
from .records import FuseRecord, RecordStore

ATTACH_TIMEOUT = 30.0


class Via(Enum):
    NBD = "nbd"
    FUSE = "fuse"


class AttachmentState(Enum):
    ATTACHED = "attached"   # device and everything behind it are there
    BROKEN = "broken"       # the loop device is there but nbdfuse is gone: I/O fails
    STALE = "stale"         # a record without its loop device: only the record is left


def nbd_uri(host: str, port: int, disk: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"nbd://{h}:{port}/{disk}"


def check_tls_dir(tls_dir: str | None) -> str | None:
    if tls_dir is None:
        return None
    tls_dir = os.path.abspath(tls_dir)
    missing = [f for f in TLS_FILES if not os.path.isfile(os.path.join(tls_dir, f))]
    if missing:
        raise Refused(f"--tls-dir {tls_dir} lacks {', '.join(missing)} "
                      "(`nbdserver tls init` writes them)")
    return tls_dir


def parse_nbd_address(text: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(text, 10809)
    except ValueError:
        raise Refused(f"invalid NBD address {text!r}: give HOST:PORT") from None
    if not host or not 1 <= port <= 65535:
        raise Refused(f"invalid NBD address {text!r}: give HOST:PORT")
    return host, port


def probe_export(host: str, port: int, disk: str, tls_dir: str | None = None) -> ExportProbe:
    """One handshake with libnbd: the export exists, its size, whether it offers multi-conn."""
    import nbd  # python3-libnbd; imported here so the pure parts need no libnbd

    h = nbd.NBD()
    try:
        if tls_dir is not None:
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(tls_dir)
        h.set_export_name(disk)
        h.connect_tcp(host, str(port))
        probe = ExportProbe(size=h.get_size(), multi_conn=bool(h.can_multi_conn()))
        h.shutdown()
        return probe
    except nbd.Error as e:
        raise ExportUnreachable(f"cannot open disk {disk!r} at {host}:{port}: {e.string}") from None
    finally:
        del h  # libnbd closes the handle (and its socket) when it is freed


class Host:
    """This machine's attachments."""

    def __init__(self, records: RecordStore | None = None, sys_root: str = "/sys"):
        self.records = records or RecordStore()
        self.sys_root = sys_root

    # -- attach
    def attach(self, disk: str, nbd_address: str, via: Via = Via.NBD, *, device: str | None = None,
               connections: int | None = None, dry_run: bool = False,
               tls_dir: str | None = None) -> dict:
        check_disk_name(disk)
        host, port = parse_nbd_address(nbd_address)
        tls_dir = check_tls_dir(tls_dir)
        if via is Via.FUSE:
            if device is not None:
                raise Refused("--device names a /dev/nbdN of the kernel driver; --via fuse takes "
                              "the first free loop device")
            if dry_run:
                raise Refused("--dry-run shows the nbd-client command line; it has no meaning "
                              "with --via fuse")
            return self._attach_fuse(disk, host, port, connections, tls_dir)
        return self._attach_nbd(disk, host, port, device, connections, dry_run, tls_dir)

    def _attach_nbd(self, disk, host, port, device, connections, dry_run, tls_dir) -> dict:
        problem = None
        try:
            kernel.require_nbd_module(self.sys_root)
        except MissingSupport as e:
            if not dry_run:
                raise
            problem = e.message
        if device is None:
            device = kernel.free_nbd_device(self.sys_root) if problem is None else "/dev/nbd0"
        probe = probe_export(host, port, disk, tls_dir)
        argv = attach_argv(host, port, device, disk, check_connections(connections, probe),
                           tls_dir=tls_dir)
        if dry_run:
            return {"argv": argv, "ready": problem is None, "problem": problem}
        busy = os.path.exists(os.path.join(self.sys_root, "block", os.path.basename(device), "pid"))
        if busy:
            raise Refused(f"{device} is already attached; detach it or choose another")
        _run(argv)
        pidfile = os.path.join(self.sys_root, "block", os.path.basename(device), "pid")
        fuse.wait_for(lambda: os.path.exists(pidfile), ATTACH_TIMEOUT, f"{device} to connect")
        return {"device": device, "disk": disk, "via": "nbd", "nbd": f"{host}:{port}",
                "state": AttachmentState.ATTACHED.value, "size": probe.size, "argv": argv}

    def _attach_fuse(self, disk, host, port, connections, tls_dir) -> dict:
        fuse.require_fuse_path()
        probe = probe_export(host, port, disk, tls_dir)
        n = check_connections(connections, probe)
        if tls_dir is not None:
            if shutil.which("nbdkit") is None:
                raise MissingSupport("--via fuse with --tls-dir needs nbdkit (Debian package nbdkit)")
            if n > 1:
                raise Refused("--via fuse with --tls-dir uses one connection (nbdkit makes the "
                              "TLS connection for nbdfuse); use --connections 1")
        if probe.size % BLOCK_SIZE:
            raise Refused(f"disk {disk!r} is {probe.size} bytes, not a multiple of {BLOCK_SIZE}")
        fuse_root = os.path.join(self.records.root, "fuse")
        os.makedirs(fuse_root, mode=0o700, exist_ok=True)
        mountpoint = os.path.join(fuse_root, f"{disk}.{secrets.token_hex(4)}")
        os.mkdir(mountpoint, 0o700)
        source = [nbd_uri(host, port, disk)] if tls_dir is None \
            else fuse.tls_source(host, port, disk, tls_dir)
        pid = fuse.start_nbdfuse(mountpoint, source, n, mountpoint + ".log")
        file = os.path.join(mountpoint, "nbd")
        try:
            device = fuse.loop_attach(file, BLOCK_SIZE)
        except BaseException:
            fuse.stop_nbdfuse(mountpoint, pid)
            raise
        rec = FuseRecord(device=device, disk=disk, nbd=f"{host}:{port}", mountpoint=mountpoint,
                         file=file, nbdfuse_pid=pid, connections=n, created=time.time())
        self.records.put(rec)
        return self._view(rec)

    # -- detach
    def detach(self, target: str) -> dict:
        """TARGET: /dev/nbdN, /dev/loopN of a fuse attachment, or a disk name attached by fuse."""
        if NBD_DEVICE.match(target):
            return self._detach_nbd(target)
        if not target.startswith("/dev/"):  # a disk name: the kernel may name its export
            held = [a for a in kernel.nbd_attachments(self.sys_root) if a["disk"] == target]
            if len(held) == 1:
                return self._detach_nbd(held[0]["device"])
        rec = self._find_record(target)
        users = fuse.device_users(rec.device) if fuse.loop_backing(rec.device) == rec.file else None
        if users:
            raise Refused(f"{rec.device} is {users}; unmount it (or stop its user) first")
        if fuse.loop_backing(rec.device) == rec.file:
            fuse.loop_detach(rec.device)
        fuse.stop_nbdfuse(rec.mountpoint, rec.nbdfuse_pid)
        self.records.remove(rec.device)
        for leftover in (rec.mountpoint + ".log",):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        return {"device": rec.device, "disk": rec.disk, "via": "fuse", "state": "detached"}

    def _find_record(self, target: str) -> FuseRecord:
        if target.startswith("/dev/"):
            rec = self.records.get(target)
            if rec is None:
                raise NotAttached(f"{target} is not a fuse attachment of this host "
                                  f"(no record in {self.records.dir})")
            return rec
        check_disk_name(target)
        matches = [r for r in self.records.all() if r.disk == target]
        if not matches:
            raise NotAttached(f"disk {target!r} is not attached on this host")
        if len(matches) > 1:
            raise Refused(f"disk {target!r} is attached more than once "
                          f"({', '.join(r.device for r in matches)}); name the device")
        return matches[0]

    def _detach_nbd(self, device: str) -> dict:
        base = os.path.join(self.sys_root, "block", os.path.basename(device))
        if not os.path.exists(os.path.join(base, "pid")):
            raise NotAttached(f"{device} is not attached (no client holds it)")
        users = fuse.device_users(device)
        if users:
            raise Refused(f"{device} is {users}; unmount it (or stop its user) first")
        argv = detach_argv(device)
        _run(argv)
        fuse.wait_for(lambda: not os.path.exists(os.path.join(base, "pid")), ATTACH_TIMEOUT,
                      f"{device} to disconnect")
        return {"device": device, "via": "nbd", "state": "detached", "argv": argv}

    # -- attachments
    def attachments(self) -> list[dict]:
        return kernel.nbd_attachments(self.sys_root) + [self._view(r) for r in self.records.all()]

    def _view(self, rec: FuseRecord) -> dict:
        if fuse.loop_backing(rec.device) != rec.file:
            state = AttachmentState.STALE
        elif not fuse.nbdfuse_alive(rec.nbdfuse_pid):
            state = AttachmentState.BROKEN
        else:
            state = AttachmentState.ATTACHED
        out = asdict(rec)
        out.update(via="fuse", state=state.value)
        return out


def _run(argv: list[str]) -> None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=ATTACH_TIMEOUT)
    except FileNotFoundError:
        raise ToolFailed(f"{argv[0]} is not installed (Debian package nbd-client)") from None
    if p.returncode != 0:
        raise ToolFailed(f"{' '.join(argv)} failed ({p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()}")
