"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

Used for Type=notify units: READY=1 once the listener accepts, STOPPING=1 on
SIGTERM. A no-op when not started by systemd.
"""
import asyncio
import os
import socket


def sd_notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        s.sendall(message.encode())
    return True


async def watchdog_loop() -> None:
    """WATCHDOG=1 every WATCHDOG_USEC/2 from the event loop (a stuck loop stops the
    pings and systemd restarts the service). Returns at once when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return
    interval = int(usec) / 2e6
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)
