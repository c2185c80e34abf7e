"""A block device without the kernel's NBD driver: nbdfuse, then a loop device on its file.

Order matters both ways. Up: nbdfuse mounts DIR with the export as DIR/nbd, then
`losetup` opens that file. Down: the loop device first (it holds DIR/nbd open, so the
FUSE mount is busy until the kernel lets go of it), then `fusermount3 -u`, after which
nbdfuse exits by itself. nbdfuse runs in the foreground (libnbd 1.14 does not fork), in
its own session so it outlives the `attach` command; `-P PIDFILE` is written only once it
serves, which is the readiness condition we wait on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from .errors import MissingSupport, ToolFailed

TOOLS = ("nbdfuse", "losetup", "fusermount3")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POLL = 0.02  # polling a local condition (a file, a mount, a pid); bounded by each deadline


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ToolFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL)


def require_fuse_path() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise MissingSupport(f"--via fuse needs {', '.join(missing)} (Debian packages libnbd-bin, "
                             "util-linux, fuse3)")
    if not os.path.exists("/dev/fuse"):
        raise MissingSupport("--via fuse needs /dev/fuse (the fuse kernel module)")
    if not os.path.exists("/dev/loop-control"):
        raise MissingSupport("--via fuse needs loop devices (/dev/loop-control is missing; "
                             "modprobe loop)")


def is_mounted(path: str) -> bool:
    """PATH is a mount point, read from the mount table: os.path.ismount() stats the path,
    which fails (ENOTCONN) on a FUSE mount whose daemon died, and so says False for
    exactly the mount we most need to remove."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
            if point == path:
                return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        # Reap it if it is our own child (it is when attach and detach run in one process).
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def nbdfuse_alive(pid: int) -> bool:
    """PID is a live nbdfuse: a recorded pid may since belong to another process."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].endswith(b"nbdfuse")
    except OSError:
        return False


def tls_source(host: str, port: int, disk: str, tls_dir: str) -> list[str]:
    """nbdfuse's source for NBD over TLS with our own certificate directory.

    libnbd refuses `?tls-certificates=` in a URI from nbdfuse (local file access through
    a URI is off by default), so nbdkit's nbd plugin makes the TLS connection and speaks
    plain NBD to nbdfuse over a socketpair (-s), dying with it (--exit-with-parent)."""
    return ["--command", "nbdkit", "-s", "--exit-with-parent", "nbd", f"hostname={host}",
            f"port={port}", f"export={disk}", "tls=require", f"tls-certificates={tls_dir}"]


def start_nbdfuse(mountpoint: str, source: list[str], connections: int, log_path: str) -> int:
    """Mount the export at MOUNTPOINT/nbd; return nbdfuse's pid once it serves.

    SOURCE: [URI], or a `--command ...` from `tls_source`."""
    pidfile = os.path.join(mountpoint + ".pid")
    for stale in (pidfile,):
        if os.path.exists(stale):
            os.unlink(stale)
    argv = ["nbdfuse", "-P", pidfile]
    if connections > 1:
        argv += ["-C", str(connections)]
    argv += [mountpoint, *source]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)

    def ready():
        if proc.poll() is not None:
            raise ToolFailed(f"nbdfuse exited ({proc.returncode}) before serving "
                             f"{' '.join(source)}: {_tail(log_path)}")
        return os.path.exists(pidfile) and is_mounted(mountpoint) \
            and os.path.exists(os.path.join(mountpoint, "nbd"))
    try:
        wait_for(ready, START_TIMEOUT, f"nbdfuse to serve {' '.join(source)}")
    except BaseException:
        stop_nbdfuse(mountpoint, proc.pid)
        raise
    finally:
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass
    return proc.pid


def stop_nbdfuse(mountpoint: str, pid: int) -> None:
    """Unmount, then wait for nbdfuse to exit; a lazy unmount only if it died already."""
    if is_mounted(mountpoint):
        p = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True,
                           timeout=STOP_TIMEOUT)
        if p.returncode != 0 and nbdfuse_alive(pid):
            raise ToolFailed(f"fusermount3 -u {mountpoint} failed: {p.stderr.strip()}")
    try:
        wait_for(lambda: not nbdfuse_alive(pid), STOP_TIMEOUT, f"nbdfuse (pid {pid}) to exit")
    except ToolFailed:
        os.kill(pid, 9)  # it ignored the unmount: nothing of the disk's data is in it
        wait_for(lambda: not pid_alive(pid), STOP_TIMEOUT, f"nbdfuse (pid {pid}) to die")
    if is_mounted(mountpoint):  # nbdfuse died without unmounting (killed, crashed)
        subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True, timeout=STOP_TIMEOUT)
    try:
        os.rmdir(mountpoint)
    except OSError:
        pass


def loop_attach(path: str, sector_size: int) -> str:
    # --direct-io=off: O_DIRECT on a FUSE file needs support nbdfuse does not promise.
    p = subprocess.run(["losetup", "-f", "--show", "--direct-io=off", "-b", str(sector_size), path],
                       capture_output=True, text=True, timeout=STOP_TIMEOUT)
    if p.returncode != 0:
        raise ToolFailed(f"losetup could not attach {path}: {p.stderr.strip()}")
    return p.stdout.strip()


def loop_backing(device: str) -> str | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def device_users(device: str) -> str | None:
    """Why DEVICE is busy (a mount, a holder such as dm-crypt), or None."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return None
    majmin = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == majmin:
                return f"mounted at {fields[4]}"
    try:
        holders = os.listdir(f"/sys/block/{os.path.basename(device)}/holders")
    except OSError:
        holders = []
    if holders:
        return f"held by {', '.join(holders)}"
    return None


def loop_detach(device: str) -> None:
    p = subprocess.run(["losetup", "-d", device], capture_output=True, text=True, timeout=STOP_TIMEOUT)
    if p.returncode != 0 and loop_backing(device) is not None:
        raise ToolFailed(f"losetup -d {device} failed: {p.stderr.strip()}")
    # The kernel lets go of the backing file asynchronously after the ioctl returns.
    wait_for(lambda: loop_backing(device) is None, STOP_TIMEOUT, f"{device} to release its file")


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:].strip() or "(no output)"
    except OSError:
        return "(no output)"
