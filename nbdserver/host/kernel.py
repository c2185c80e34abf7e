"""The kernel's NBD driver: is it there, which /dev/nbdN are free, which are attached.

The driver's state is read from sysfs (/sys/block/nbdN/pid exists while a client holds
the device; /sys/block/nbdN/backend names the export on kernels >= 5.x). The generic
netlink family "nbd" carries the same facts; sysfs needs no extra protocol code and is
there on every kernel that has the driver, so it is the one source we read.
"""

from __future__ import annotations

import os
import re
import subprocess

from .errors import MissingSupport

NBD_NAME = re.compile(r"^nbd([0-9]+)$")


def require_nbd_module(sys_root: str = "/sys") -> None:
    """The driver is loaded, or `modprobe nbd` loads it; otherwise say what is missing."""
    if os.path.isdir(os.path.join(sys_root, "module", "nbd")):
        return
    try:
        p = subprocess.run(["modprobe", "nbd"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise MissingSupport("the nbd kernel module is not loaded and modprobe is not installed "
                             "(Debian package kmod); or use --via fuse") from None
    if p.returncode != 0 or not os.path.isdir(os.path.join(sys_root, "module", "nbd")):
        why = (p.stderr or p.stdout).strip() or f"modprobe exited {p.returncode}"
        raise MissingSupport(f"the nbd kernel module is not loaded and cannot be loaded "
                             f"({why}); this kernel has no NBD driver: use --via fuse")


def nbd_devices(sys_root: str = "/sys") -> list[str]:
    """Names (nbd0, nbd1, ...) of the driver's devices, in numeric order."""
    try:
        names = [n for n in os.listdir(os.path.join(sys_root, "block")) if NBD_NAME.match(n)]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda n: int(n.removeprefix("nbd")))  # NBD_NAME: nbd + digits


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def nbd_attachments(sys_root: str = "/sys") -> list[dict]:
    """Every /dev/nbdN a client holds: device, the client's pid, size, export when known."""
    out = []
    for name in nbd_devices(sys_root):
        base = os.path.join(sys_root, "block", name)
        pid = _read(os.path.join(base, "pid"))
        if pid is None:
            continue
        sectors = _read(os.path.join(base, "size"))
        out.append({"device": f"/dev/{name}", "via": "nbd", "state": "attached",
                    "disk": _read(os.path.join(base, "backend")) or None,
                    "pid": int(pid) if pid.isdigit() else None,
                    # sysfs `size` counts 512-byte sectors whatever the logical block size.
                    "size": int(sectors) * 512 if sectors and sectors.isdigit() else None})
    return out


def free_nbd_device(sys_root: str = "/sys") -> str:
    for name in nbd_devices(sys_root):
        if not os.path.exists(os.path.join(sys_root, "block", name, "pid")):
            return f"/dev/{name}"
    raise MissingSupport("every /dev/nbdN is in use; load the module with more devices "
                         "(modprobe nbd nbds_max=N) or detach one")
