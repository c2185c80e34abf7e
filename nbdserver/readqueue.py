"""Which native read queue serves cold reads: io_uring (`_uring.RingQueue`) or threads
(`_readq.ReadQueue`). Both have the same API (submit, collect, close, fileno), so the
server and the backends never know which they have.

The ring by default, when this kernel lets the process make one: containers' seccomp
profiles and `kernel.io_uring_disabled` refuse io_uring_setup, and then the thread
queue serves. The environment variable NBDSERVER_READQ (`uring`, `threads` or `auto`)
overrides: an environment variable, not an option, because every process that reads
(the server and its I/O worker processes, the baseline) inherits it. The choice is made
once per process and logged once at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ._readq import ReadQueue

log = logging.getLogger("nbdserver.readqueue")

ENV = "NBDSERVER_READQ"
KINDS = ("auto", "uring", "threads")
# How the ring runs its completions' task work (RingQueue's `taskrun`): `signal`, the
# kernel's default, unless this says `coop` or `defer`. Measured on a shared host, none
# of them was ahead (docs/operations.md, "Cache modes"): kept for a quiet host's bench.
TASKRUN_ENV = "NBDSERVER_URING_TASKRUN"
TASKRUNS = ("signal", "coop", "defer")

_chosen: str | None = None  # "uring" or "threads", once decided in this process


def _ring_error() -> OSError | None:
    """Why this process cannot make a ring (a small one, made and closed), or None."""
    try:
        from ._uring import RingQueue
        RingQueue(2).close()
    except ImportError as e:  # built without it (an old build tree)
        return OSError(f"nbdserver._uring is not built: {e}")
    except OSError as e:
        return e
    return None


def chosen_kind() -> str:
    """`uring` or `threads`: what `make_read_queue` makes in this process."""
    global _chosen
    if _chosen is not None:
        return _chosen
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want not in KINDS:
        log.warning("%s=%r is none of %s; choosing as for auto", ENV, want, ", ".join(KINDS))
        want = "auto"
    if want == "threads":
        _chosen = "threads"
        log.info("cold reads on the thread read queue (%s=threads)", ENV)
        return _chosen
    error = _ring_error()
    if error is None:
        _chosen = "uring"
        log.info("cold reads on io_uring (%s=%s)", ENV, want)
    else:
        _chosen = "threads"
        level = logging.WARNING if want == "uring" else logging.INFO
        log.log(level, "cold reads on the thread read queue: io_uring is not available (%s)", error)
    return _chosen


def make_read_queue(depth: int):
    """A read queue for at most `depth` reads at once (ring slots, or threads); reads
    past that wait in order. A ring that cannot be made now (its memory is locked and
    counted against RLIMIT_MEMLOCK on old kernels) falls back to threads. Made on an
    event loop, the ring submits the reads of each turn of the loop together."""
    if chosen_kind() == "uring":
        from ._uring import RingQueue
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        try:
            if loop is None:
                return RingQueue(depth, taskrun=_taskrun())
            # call_later: a ring the kernel keeps refusing is retried with a back-off.
            return RingQueue(depth, loop.call_soon, taskrun=_taskrun(), later=loop.call_later)
        except OSError as e:
            log.warning("io_uring read queue refused (%s); this one runs on threads", e)
    return ReadQueue(depth)


def _taskrun() -> str:
    mode = os.environ.get(TASKRUN_ENV, "signal").strip().lower() or "signal"
    if mode not in TASKRUNS:
        log.warning("%s=%r is none of %s; using signal", TASKRUN_ENV, mode, ", ".join(TASKRUNS))
        return "signal"
    return mode
