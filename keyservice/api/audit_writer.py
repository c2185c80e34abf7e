"""Group commit of audit entries: the calls that finish while one commit is under way
share the next transaction, and with it one fsync.

Why: every audited call used to commit its entry in a transaction of its own on the
domain thread (WAL, synchronous=FULL), so a burst of unwraps (a re-enabled key whose
disks all reopen) spent most of that thread's time in one fsync per call, and every
other call waited behind them.

The promise does not change: a call is answered only after its entry is durable.
`record(entry)` returns when the transaction holding the entry has committed, and raises
what that commit raised. Entries are appended in the order `record` was called, each
chain's hash links computed in that one transaction (`store.append_audit_many`), so a
batch is a sequence of ordinary appends. A batch that fails is retried entry by entry
(`KeyService.record_many`): one bad entry costs no other call its record.

There is never more than one batch on the domain thread: whatever arrives meanwhile
waits for the next one, which is what makes batches form under load and keeps a lone
call's latency what it was (its batch is itself). `MAX_BATCH` bounds one transaction.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("keyservice")

MAX_BATCH = 256  # entries per transaction: a few hundred KiB of WAL at most

Commit = Callable[[list[dict]], Awaitable[list[Exception | None]]]


class AuditWriter:
    """Used from the event loop only."""

    def __init__(self, commit: Commit, max_batch: int = MAX_BATCH):
        self._commit = commit
        self._max_batch = max_batch
        self._pending: list[tuple[dict, asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def record(self, entry: dict) -> None:
        """Return once `entry` is committed. A caller that is cancelled meanwhile does not
        take its entry back: it is committed all the same."""
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        self._pending.append((entry, fut))
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        await asyncio.shield(fut)

    async def _run(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self._max_batch]
                del self._pending[:len(batch)]
                try:
                    outcomes = await self._commit([entry for entry, _ in batch])
                except Exception as e:  # the domain thread is gone (shutdown), or worse
                    outcomes = [e] * len(batch)
                for (entry, fut), error in zip(batch, outcomes, strict=True):
                    if error is not None:  # the call itself is done: say loudly its record is missing
                        log.error("request %s: audit append failed: %r", entry.get("requestId", "-"), error)
                    if fut.done():
                        continue
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)
        finally:
            self._task = None

    async def close(self) -> None:
        """Wait until every entry recorded so far is committed (or failed)."""
        while self._task is not None:
            await asyncio.shield(self._task)


def _retrieve(fut: asyncio.Future) -> None:
    """An entry's error is logged by `_run`; consume it here too, so a caller that went
    away leaves no "exception was never retrieved" behind."""
    if not fut.cancelled():
        fut.exception()
