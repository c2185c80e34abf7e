"""Control-plane operations: the names each one claims, its deadline, and its task.

The lock discipline of the platform (docs/architecture.md, "Lock discipline"):

- An operation claims every name it works on when it starts, all at once and without
  waiting: exclusively what it creates, changes or deletes (a disk being moved, a new
  snapshot's name), shared what it only relies on (the disk a snapshot copies, the
  snapshot a disk is made from, the encryption set a volume is created in or moved
  between). A conflicting claim is refused at once with `Busy` (409), whose message
  names the operation in progress. Nothing ever waits for a claim, so there is no
  order to get wrong and no deadlock.
- The operation then runs as its own task, under a deadline: past it the task is
  cancelled, rolls back what it had done (every step is written to undo itself on
  cancellation), and fails with `TimedOut` (504). The caller awaits the task through a
  shield: an HTTP client that goes away does not stop it half-way.
- Revocation takes no claim at all (see `access`): it must never be refused or wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from .errors import Conflict, PlatformError
from .model import PLATFORM_KEY

log = logging.getLogger("nbdserver.platform")

DEADLINE = 120.0  # seconds: key-service calls time out after 10 s each; a few per operation
COPY_RATE = 20 << 20  # bytes per second granted on top of DEADLINE to operations that copy data


class Busy(Conflict):
    code = "OperationInProgress"


class TimedOut(PlatformError):
    status = 504
    code = "OperationTimedOut"


def disk(name: str) -> str:
    return f"disk {name!r}"


def volume(kind, name: str) -> str:
    return f"{kind.value} {name!r}"


def scope(name: str) -> str:
    """The set itself: exclusive to create or delete it, shared by all that use it."""
    return "the platform-managed key" if name == PLATFORM_KEY else f"encryption set {name!r}"


def key_of(name: str) -> str:
    """Which key the set's volumes are wrapped with: exclusive to a rotation, shared by
    moves. Creations and copies do not claim it: a rotation reconciles them (see
    `EncryptionSetOperations._rotate`), so a long copy never holds a rotation back."""
    return "the platform-managed key" if name == PLATFORM_KEY else f"the key of encryption set {name!r}"


@dataclass
class Running:
    what: str
    exclusive: tuple[str, ...]
    shared: tuple[str, ...]
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None

    def view(self) -> dict:
        return {"operation": self.what, "claims": list(self.exclusive + self.shared),
                "seconds": round(time.monotonic() - self.started, 3)}


class Operations:
    def __init__(self, deadline: float = DEADLINE):
        self.deadline = deadline
        self._exclusive: dict[str, Running] = {}
        self._shared: dict[str, list[Running]] = {}
        self.running: list[Running] = []

    def _refuse(self, name: str, holder: Running) -> Busy:
        age = time.monotonic() - holder.started
        return Busy(f"{name} is busy: {holder.what} is in progress (for {age:.1f}s); "
                    "retry when it has finished")

    def claim(self, what: str, *, exclusive=(), shared=()) -> Running:
        """Claim names for an operation, all or none, or raise Busy. Never waits."""
        exclusive, shared = tuple(dict.fromkeys(exclusive)), tuple(
            n for n in dict.fromkeys(shared) if n not in exclusive)
        for n in exclusive + shared:
            if n in self._exclusive:
                raise self._refuse(n, self._exclusive[n])
        for n in exclusive:
            if self._shared.get(n):
                raise self._refuse(n, self._shared[n][0])
        r = Running(what, exclusive, shared)
        for n in exclusive:
            self._exclusive[n] = r
        for n in shared:
            self._shared.setdefault(n, []).append(r)
        self.running.append(r)
        return r

    def release(self, r: Running) -> None:
        for n in r.exclusive:
            if self._exclusive.get(n) is r:
                del self._exclusive[n]
        for n in r.shared:
            holders = self._shared.get(n, [])
            if r in holders:
                holders.remove(r)
            if not holders:
                self._shared.pop(n, None)
        if r in self.running:
            self.running.remove(r)

    def start(self, what: str, fn, *, exclusive=(), shared=(), deadline: float | None = None):
        """Claim, then run `fn()` (a coroutine function) as a task under the deadline.
        Returns the task; await it with `asyncio.shield` (see `finish`)."""
        r = self.claim(what, exclusive=exclusive, shared=shared)
        limit = self.deadline if deadline is None else deadline

        async def run():
            try:
                async with asyncio.timeout(limit):
                    return await fn()
            except TimeoutError:
                raise TimedOut(f"{what} did not finish within its deadline of {limit:.0f}s; "
                               "what it had done was undone") from None
            finally:
                self.release(r)

        r.task = asyncio.create_task(run(), name=what)
        # A caller that went away never reads the outcome: read it here, so asyncio does
        # not log an unread exception as an error.
        r.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return r.task

    async def cancel_all(self) -> None:
        """At shutdown: cancel what still runs and let each roll itself back."""
        tasks = [r.task for r in self.running if r.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def views(self) -> list[dict]:
        return [r.view() for r in self.running]


async def finish(task: asyncio.Task):
    """Await an operation's task without letting the caller's cancellation reach it."""
    return await asyncio.shield(task)
