"""Long operations as a client follows them: an id, a kind, progress, then a result or
an error; kept in the platform's state so they outlive the process that ran them.

The API answers 202 with an operation (`GET /operations/{id}` then reports it). Each one
is written to the state when it starts and when it ends. An operation that was still
running when the server stopped cannot be resumed: its task died with the process, and
the start-up sweep (`Platform._remove_unfinished`) removed what it had half made. So at
start every row still marked running becomes `interrupted`, with an error that says so,
and a client waiting on it learns the outcome instead of a 404 for an id it was given.

Statuses: running -> succeeded | failed; running -> interrupted (only across a restart).
Times: `started`/`ended` in epoch seconds, `startTime`/`endTime` in RFC 3339.
Progress is a fraction in memory only: a client polls it, and it dies with the run.

Retention: a finished operation is kept for `RETENTION` after it ended, and at most the
`KEEP` that ended last, so the table stays small however long the server runs; pruned at
start (after the sweep) and whenever an operation ends. A running one is never pruned:
its client is still following it. Long enough for a client that polls after a weekend,
or a script that lists what happened overnight; what must last longer is in the logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from daemonkit.rfc3339 import format_time

from .errors import NotFound, PlatformError

if TYPE_CHECKING:
    from .state import State

log = logging.getLogger("nbdserver.platform")

KEEP = 1000  # finished operations kept in the state at most (also what list() shows)
RETENTION = 7 * 24 * 3600.0  # seconds a finished operation is kept after it ended
RECENT = 64  # finished ones also kept in memory, should the state fail to record them
INTERRUPTED = {"code": "OperationInterrupted", "status": 503,
               "message": "the server stopped while this operation ran; what it had done was "
                          "undone at the next start: run it again"}


class OperationLog:
    def __init__(self, state: State, *, retention: float = RETENTION, keep: int = KEEP):
        self.state = state
        self.retention, self.keep = retention, keep
        self.live: dict[str, dict] = {}  # running in this process: id -> its view
        self._recent: dict[str, dict] = {}  # the last RECENT finished, should the state fail
        swept = state.interrupt_running_operations(time.time(), INTERRUPTED)
        if swept:
            log.warning("%d operation(s) were running when the server stopped; reported as "
                        "interrupted", swept)
        self.prune()

    def prune(self) -> int:
        """Forget finished operations past the retention window or the row cap (see the
        module docstring). Housekeeping: a state that refuses it is logged, not fatal."""
        try:
            gone = self.state.forget_operations(self.keep, time.time() - self.retention)
        except Exception:
            log.exception("cannot prune finished operations")
            return 0
        if gone:
            log.debug("forgot %d finished operation(s) past retention", gone)
        return gone

    def start(self, kind: str, target: str, start_fn: Callable[[Callable[[float], None]], asyncio.Task],
              total_bytes: int | None = None) -> dict:
        """`start_fn(progress)` starts the platform's operation and returns its task; it is
        called here, so a refusal (a name in use: 409) is the request's answer and leaves
        no operation behind."""
        now = time.time()
        op: dict[str, Any] = {"id": uuid.uuid4().hex[:16], "kind": kind, "target": target,
                              "status": "running", "progress": 0.0, "bytesTotal": total_bytes,
                              "started": now, "startTime": format_time(now)}

        def progress(fraction: float) -> None:
            op["progress"] = round(min(max(fraction, 0.0), 1.0), 4)

        task = start_fn(progress)
        try:
            self.state.put_operation(op)
        except BaseException:
            # Unrecorded, it could not be followed or reported: undo it (each step of an
            # operation undoes itself on cancellation) and answer the state's error.
            task.cancel()
            raise
        self.live[op["id"]] = op

        async def run():
            try:
                op["result"] = await task
                op["status"], op["progress"] = "succeeded", 1.0
                log.info("operation %s (%s) succeeded", op["id"], kind, extra={"operation": op["id"]})
            except PlatformError as e:
                op["status"], op["error"] = "failed", {"code": e.code, "message": e.message,
                                                       "status": e.status}
                log.info("operation %s (%s) failed: %s", op["id"], kind, e.message,
                         extra={"operation": op["id"]})
            except asyncio.CancelledError:
                op["status"], op["error"] = "interrupted", dict(INTERRUPTED)
                raise
            except Exception:
                log.exception("operation %s failed", op["id"])
                op["status"], op["error"] = "failed", {"code": "InternalError",
                                                       "message": "internal error", "status": 500}
            finally:
                op["ended"] = time.time()
                op["endTime"] = format_time(op["ended"])
                self._record_end(op)

        op_task = asyncio.create_task(run())
        op_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return dict(op)

    def _record_end(self, op: dict) -> None:
        try:
            self.state.put_operation(op)
        except Exception:  # the outcome stays visible in memory for this run
            log.exception("cannot record the end of operation %s", op["id"])
        self.prune()
        self.live.pop(op["id"], None)
        self._recent[op["id"]] = op
        while len(self._recent) > RECENT:
            self._recent.pop(next(iter(self._recent)))

    def view(self, op_id: str) -> dict:
        op = self.live.get(op_id) or self._recent.get(op_id) or self.state.get_operation(op_id)
        if op is None:
            raise NotFound(f"operation {op_id!r} not found")
        return dict(op)

    def list(self) -> list[dict]:
        """Running ones first, then the rest newest first."""
        stored = self.state.list_operations(self.keep)
        live = [dict(op) for op in self.live.values()]
        ids = {op["id"] for op in live}
        return live + [op for op in stored if op["id"] not in ids]
