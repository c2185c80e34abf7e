"""Copies of volume data, run on worker threads, reporting progress.

- `copy_ciphertext`: a byte-exact copy of an encrypted file (a snapshot keeps its disk's
  DEK, so its ciphertext is copied as is). Only data extents are copied; holes stay holes.
- `reencrypt`: decrypt through the source's XtsLayer and encrypt through the target's
  (a disk made from a snapshot or an image gets its own DEK). Holes are skipped.
Both make the target durable (fsync) before returning.

`run_copy` runs either on a worker thread so that the awaiting operation can be cancelled
(deadline, shutdown) safely: the copy stops at its next chunk and the thread has left
before the operation's rollback unlinks the file or closes the layers the copy uses.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

from ..backend import BlockBackend, file_extents

CHUNK = 4 << 20
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class CopyStopped(Exception):
    """The operation that asked for the copy was cancelled; the copy stopped part-way."""


async def run_copy(fn, *args, progress: Progress | None = None):
    """fn(*args, progress) on a worker thread; on cancellation, stop it and wait for it."""
    stop = threading.Event()

    def report(done: int, total: int) -> None:
        if stop.is_set():
            raise CopyStopped()
        if progress:
            progress(done, total)

    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args, report)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        stop.set()
        # Bounded by one chunk; a second cancellation must not cut this wait short either.
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        if not fut.cancelled():
            fut.exception()  # read, so asyncio does not log it: the cancellation wins
        raise


def copy_ciphertext(src: str, dst: str, size: int, progress: Progress | None = None) -> None:
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fout, size)
            extents = file_extents(fin, 0, size, size)
            total = sum(e.length for e in extents if not e.hole) or 1
            done, pos = 0, 0
            for e in extents:
                if not e.hole:
                    off, end = pos, pos + e.length
                    while off < end:
                        n = os.copy_file_range(fin, fout, min(CHUNK, end - off), off, off)
                        if n == 0:
                            raise OSError(5, "short copy")
                        off += n
                        done += n
                        if progress:
                            progress(done, total)
                pos += e.length
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    if progress:
        progress(1, 1)


def reencrypt(src: BlockBackend, dst: BlockBackend, progress: Progress | None = None) -> None:
    size = src.size
    extents = []
    pos = 0
    while pos < size:
        for e in src.block_status(pos, size - pos):
            extents.append((pos, e.length, e.zero))
            pos += e.length
    total = sum(n for _, n, z in extents if not z) or 1
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    for off, n, zero in extents:
        if zero:
            continue
        end = off + n
        while off < end:
            k = min(CHUNK, end - off)
            src.pread(view[:k], off)
            dst.pwrite(view[:k], off)
            off += k
            done += k
            if progress:
                progress(done, total)
    dst.flush()
    if progress:
        progress(1, 1)
