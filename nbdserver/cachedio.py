"""The page-cache fast path of the transmission phase: the READs and small WRITEs at the
head of a received chunk, answered in one native call (nbdserver/_cachedio.c).

The server (`Connection._answer_cached`) calls `answer` for each chunk it receives when
nothing else is in the way (no request pending or parsed in part, the disk neither locked
nor frozen). The disk's backend says, per call, how its page-cache reads and writes are
done (`BlockBackend.page_cache_reads` / `page_cache_writes`: the fd, the transform
capsule, the sector locks); the native call does exactly that, and declines what it
cannot do so: those requests then take the server's usual path, which sends what it
always sent.
"""

from __future__ import annotations

from typing import NamedTuple

from ._cachedio import answer as _answer
from ._cachedio import serve as _serve
from .backend import BlockBackend

# The most READ data per call, and the largest WRITE (an encrypted disk's stripe of
# sector locks, crypto/sector_locks.py, bounds it further). The largest READ is the
# caller's (`max_read`: the server's INLINE_READ_MAX).
MAX_BYTES = 1 << 20
MAX_WRITE = 64 * 1024


class Answered(NamedTuple):
    consumed: int  # bytes of the chunk answered
    replies: bytes  # their replies, in order
    reads: int
    read_bytes: int
    writes: int
    write_bytes: int
    sampled: int  # the command of the request at index `sample`, or -1 if not answered
    missed: int  # 1: it stopped at a READ the page cache lacks (tried with RWF_NOWAIT)


def answer(data: bytes | bytearray | memoryview, backend: BlockBackend, *, size: int,
           min_block: int, structured: bool, read_only: bool, max_requests: int,
           max_read: int, max_bytes: int = MAX_BYTES, reads: bool = True,
           sample: int = -1) -> Answered | None:
    """Answer the requests at the head of `data` that `backend`'s page cache serves: at
    most `max_requests` of them, READs of at most `max_read` bytes and `max_bytes` of
    READ data in all, for a client told the
    disk's `size` that agreed to `min_block` (1: any) and to `structured` replies; READs
    only with `reads` (the server stops trying on cold data). `sample`: the index among
    them of the request whose latency is sampled (-1: none). None when the backend
    offers neither path now; else what was answered (maybe nothing)."""
    channels = _channels(backend, reads=reads, read_only=read_only)
    if channels is None:
        return None
    read_fd, read_transform, unit, write_fd, write_transform, locks, per = channels
    return Answered(*_answer(data, size, unit, max(unit, min_block), structured, max_bytes,
                             max_requests, max_read, read_fd, read_transform, MAX_WRITE,
                             write_fd, write_transform, locks, per, sample))


def _channels(backend: BlockBackend, *, reads: bool, read_only: bool) -> tuple | None:
    """What the native calls are told of `backend` now: (read_fd, read_transform, unit,
    write_fd, write_transform, locks, per); None when it offers neither path."""
    cached = backend.page_cache_reads() if reads else None
    # check()'s rule for a WRITE without flags: refused (EPERM) where read-only.
    writes = None if read_only else backend.page_cache_writes()
    if cached is None:
        if writes is None:
            return None
        read_fd, read_transform, unit = -1, None, writes[2]
    else:
        read_fd, read_transform, unit = cached
    if writes is None or writes[2] != unit:
        return read_fd, read_transform, unit, -1, None, None, 0
    write_fd, write_transform, _, locks, per = writes
    return read_fd, read_transform, unit, write_fd, write_transform, locks, per


class Served(NamedTuple):
    reason: int  # why it returned: DECLINED, IDLE, STOPPED or CLOSED
    leftover: bytes  # received and not answered: the caller's parser takes them
    unsent: bytes  # replies not sent yet (stopped while the client did not read): sent first
    reads: int
    read_bytes: int
    writes: int
    write_bytes: int
    missed: int  # 1: it returned at a READ the page cache lacks
    samples: bytes  # (command, nanoseconds) as native uint64 pairs: the timed requests


DECLINED, IDLE, STOPPED, CLOSED = range(4)


def serve_prepared(backend: BlockBackend, *, size: int, min_block: int, structured: bool,
                   read_only: bool, max_read: int, reads: bool = True):
    """On the event loop: what `serve` needs of `backend` now, as a function of
    (sock, stop_fd, stop_flag, idle_ms, max_ms, every, next) for a thread to run (it
    gives the GIL up; every `every`-th request from index `next` is timed; to stop it, set
    stop_flag[0] and signal the eventfd stop_fd); None when the backend offers neither
    path now. READs only with `reads`, as for `answer`."""
    channels = _channels(backend, reads=reads, read_only=read_only)
    if channels is None:
        return None
    read_fd, read_transform, unit, write_fd, write_transform, locks, per = channels

    def serve(sock: int, stop_fd: int, stop_flag: bytearray, idle_ms: int, max_ms: int,
              every: int = 0, next: int = 0) -> Served:
        return Served(*_serve(sock, stop_fd, stop_flag, size, unit, max(unit, min_block), structured,
                              max_read, read_fd, read_transform, MAX_WRITE, write_fd,
                              write_transform, locks, per, idle_ms, max_ms, every, next))
    return serve
