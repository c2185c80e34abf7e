"""Which process of a multi-process server holds what, read from /proc (root for a
non-dumpable daemon's /proc/PID/fd)."""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    """A process's child processes (a server's I/O workers)."""
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue
    return sorted(kids)


def _socket_inodes(port: int) -> set[str]:
    """Inodes of the established TCP sockets whose local port is `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def connections_held(pids: list[int], port: int) -> dict[int, int]:
    """pid -> established connections to local `port` among its descriptors."""
    inodes = _socket_inodes(port)
    out = {}
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    n += 1
        except FileNotFoundError:
            continue
        out[pid] = n
    return out
