"""One memory budget for the request and reply buffers of every connection.

Each connection already stops reading at its in-flight limit and while its client does
not read its replies, but that bounds memory per connection only: 64 READs of 32 MiB
that a client never reads hold 2 GiB, and three such connections took 6.8 GB. So a READ
takes its buffer's size from this budget before its buffer exists, and a connection
that finds the budget spent (or its own share of it) waits, reading nothing more, until
buffers come back. A READ's share comes back once its reply has left the process (the
transport's write buffer has drained past it) or its connection closed.

Theory of operation: a holder (a connection) keeps two counts, the buffers of READs in
progress and the reply bytes handed to its transport and not yet known sent. The
transport does not say when bytes leave, so a holder settles (gives back what its
transport no longer holds) after it writes, when its transport resumes, and, while
anyone waits, on a short poll. Invariants:
1. `used` is the sum of what holders hold, never negative.
2. A holder never holds more than `share`, nor `used` exceed `limit` - except one
   request, when nothing else is held, so a request larger than either still runs.
3. A holder that was refused is woken (`budget_ready`) once there may be room.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque

from .protocol.constants import MAX_BLOCK_SIZE

# Settling while someone waits: transports report no progress below their high mark.
POLL_INTERVAL = 0.02
DEFAULT_LIMIT = 1 << 30


def default_limit() -> int:
    """1 GiB, or a quarter of the machine's memory if that is less."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return DEFAULT_LIMIT
    return max(2 * MAX_BLOCK_SIZE, min(DEFAULT_LIMIT, ram // 4))


class BufferBudget:
    def __init__(self, limit: int, share: int | None = None):
        if limit < MAX_BLOCK_SIZE:
            raise ValueError(f"the buffer budget must be at least {MAX_BLOCK_SIZE >> 20} MiB")
        self.limit = limit
        # No connection takes more than a quarter: one client that never reads its
        # replies cannot stall every other.
        self.share = share or max(MAX_BLOCK_SIZE, limit // 4)
        self.used = 0
        self._waiters: deque = deque()
        self._holders: set = set()  # holders with reply bytes not yet known sent
        self._poll: asyncio.TimerHandle | None = None
        self._wake_pending = False

    def take(self, holder, n: int) -> bool:
        """Charge n bytes to `holder`, or register it to be woken and return False."""
        if self.try_take(holder, n):
            return True
        self.settle_all()
        if self.try_take(holder, n):
            return True
        if holder not in self._waiters:
            self._waiters.append(holder)
        self._schedule_poll()
        return False

    def try_take(self, holder, n: int) -> bool:
        """Charge n bytes to `holder` if they fit now; never waits (no wake-up is
        registered). For an optional fast path whose caller has another way to go."""
        if self._fits(holder, n):
            self.used += n
            return True
        return False

    def _fits(self, holder, n: int) -> bool:
        held = holder.budget_held
        if held + n <= self.share and self.used + n <= self.limit:
            return True
        return held == 0 and self.used == 0  # one oversized request alone (invariant 2)

    def add(self, n: int) -> None:
        """Charge n bytes that exist already (replies a native session could not send,
        server.Connection._session_done), whether or not they fit: the holder hands
        them to its transport at once, and they come back as any reply's do."""
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        if self._waiters and not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def holding_replies(self, holder) -> None:
        self._holders.add(holder)

    def replies_sent(self, holder) -> None:
        self._holders.discard(holder)

    def forget(self, holder) -> None:
        """A closed holder: never wake it."""
        self._holders.discard(holder)
        try:
            self._waiters.remove(holder)
        except ValueError:
            pass

    def settle_all(self) -> None:
        for h in list(self._holders):
            h.budget_settle()

    def _wake(self) -> None:
        self._wake_pending = False
        waiting, self._waiters = self._waiters, deque()
        while waiting:
            if self.used >= self.limit:
                self._waiters.extendleft(reversed(waiting))  # keep their order
                break
            waiting.popleft().budget_ready()
        if self._waiters:
            self._schedule_poll()

    def _schedule_poll(self) -> None:
        if self._poll is None:
            self._poll = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._on_poll)

    def _on_poll(self) -> None:
        self._poll = None
        if self._waiters:
            self.settle_all()
            self._wake()
