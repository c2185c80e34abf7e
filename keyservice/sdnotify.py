"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

Used for Type=notify units: READY=1 once the listener accepts, STOPPING=1 on
SIGTERM. A no-op when not started by systemd.
"""
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
