"""Process plumbing of nbdserver's entry points: event loop, signals, memory, limits.

sd_notify and the watchdog are daemonkit.sdnotify's, shared with the key service."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from daemonkit.httplog import MalformedRequestLog
from daemonkit.logsetup import configure
from daemonkit.sdnotify import watchdog_loop

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
# Request buffers below 32 MiB come from the heap, not a fresh mmap each (a maximal
# 32 MiB NBD request, with its object header, is still mmapped)...
MMAP_THRESHOLD = 32 << 20  # glibc's most on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
# ... and up to this much freed memory at the top of a heap stays mapped for the next.
TRIM_THRESHOLD = 256 << 20


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or HOST."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host, int(port)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    configure(level, fmt)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestLog())


def harden_process() -> None:
    """No core dumps: a served disk's DEK lives in this process's memory (it must, to
    encrypt), and a core file would put it on disk in the clear. RLIMIT_CORE 0 stops the
    kernel writing one; PR_SET_DUMPABLE 0 also keeps unprivileged users from attaching
    to the process or reading /proc/PID/mem."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # pragma: no cover - Linux only
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns the soft limit now in force.

    The soft limit is often 1024 (the kernel's and most shells' default) while the hard
    one is far higher (systemd gives services 524288): the server's connection cap is
    computed from the soft limit (nbdserver/admission.py), so raising it lets the
    caps, not an accident of the environment, decide how many clients fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # pragma: no cover - a hard limit the kernel caps lower
            logging.getLogger(__name__).warning("cannot raise RLIMIT_NOFILE to %s: %s", hard, e)
    return soft


def tune_allocator() -> bool:
    """Keep freed request buffers for reuse instead of handing them back to the kernel.

    Every large NBD request allocates a payload buffer (1 MiB for a typical sequential
    request). With glibc's default, dynamic thresholds, whether such a buffer is carved
    from memory the process already has or from pages freshly faulted in (and zeroed by
    the kernel) depends on the heap's history: one server instance of two identical ones
    took about 930,000 page faults per 6-second 1 MiB write run and wrote at 1.4 GiB/s
    where the other took none and wrote at 2.6 GiB/s. Fixed thresholds make every
    instance the fast one. The cost: the heap stays at the high-water mark of requests
    in flight at once (each connection stops reading at its in-flight limit), less what
    lies above TRIM_THRESHOLD of free memory at its top. Returns False, after logging
    why, where the C library has no `mallopt` or refuses a value (musl's is a stub; a
    32-bit glibc allows less): the allocator's defaults apply there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        logging.getLogger(__name__).info("no mallopt: malloc thresholds left as they are")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = True
    for param, value, name in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
                               (M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if mallopt(param, value) != 1:
            logging.getLogger(__name__).warning("mallopt(%s, %d) refused", name, value)
            ok = False
    return ok


def run(main) -> None:
    """Run `main(stop: asyncio.Event)` on uvloop when available; SIGTERM/SIGINT set `stop`."""
    harden_process()
    raise_fd_limit()
    tune_allocator()
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio works too
        runner = asyncio.run

    async def wrapper():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watchdog = asyncio.create_task(watchdog_loop())
        try:
            await main(stop)
        finally:
            watchdog.cancel()

    runner(wrapper())
