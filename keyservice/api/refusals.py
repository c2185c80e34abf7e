"""Audit of calls that proved no identity, and the size of what is audited.

A refused call without a valid token costs the caller nothing, so recording each one
would let anyone grow any vault's audit chain at will (2000 requests with huge names
were 16 MB). Such calls are counted instead: into the service chain only (a caller who
proved nothing does not get to write into a vault's chain), one entry per (operation,
status, error) per `interval` with how many there were. Every audited string is capped.
"""
import asyncio
import time

FIELD_LIMIT = 256  # characters of any one audited value (names are at most 127 legitimately)


def cap(value, limit: int = FIELD_LIMIT):
    """`value` if short enough, else its head and a marker saying how much was cut."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}...[{len(value) - limit} more characters]"
    return value


class RefusalTally:
    """Used from the event loop only. `record(entry)` is a coroutine that appends to the
    service chain."""

    def __init__(self, record, interval: float = 1.0):
        self._record = record
        self._interval = interval
        self._pending: dict[tuple, list] = {}  # key -> [count, first time]
        self._tasks: set[asyncio.Task] = set()

    def count(self, operation: str, status: int, error: str | None) -> None:
        key = (operation, status, error)
        if key in self._pending:
            self._pending[key][0] += 1
            return
        self._pending[key] = [1, time.time()]
        asyncio.get_running_loop().call_later(self._interval, self._flush_soon, key)

    def _flush_soon(self, key) -> None:
        task = asyncio.ensure_future(self._flush(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, key) -> None:
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        operation, status, error = key
        await self._record({"time": time.time(), "since": entry[1], "operation": operation,
                            "status": status, "error": error, "caller": None,
                            "unauthenticatedCount": entry[0]})

    async def close(self) -> None:
        """Record what is still being counted (at shutdown)."""
        for key in list(self._pending):
            await self._flush(key)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
