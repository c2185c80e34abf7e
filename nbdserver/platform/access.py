"""Revocation: keep every served disk's key access true to the key service, fast.

A *scope* is an encryption set (or PLATFORM_KEY); its disks are grouped by the exact key
version (`kid`) that wrapped their DEKs. `recheck(scope)` asks the key service, with the
scope's own identity, for `get` on and `unwrapKey` with each kid in use:

- refused (disabled, expired, not yet valid, deleted, permission removed): every disk of
  that kid is closed now: its export is locked (new requests EIO, new clients refused),
  in-flight requests finish, the file is flushed, and the DEK is wiped;
- answered: disks of that kid that were locked are opened again (a fresh unwrap);
- unreachable (not a revocation): nothing changes until the scope has gone `grace`
  seconds without a successful check; then its disks are closed too, and they open again
  at the first successful check.

Triggers: the key service's change stream (`events`: within a second of the owner's
call), a timer at each key's expiry time, and the lease: a recheck of every scope every
`lease` seconds, which catches whatever the stream missed while it was down.

A recheck takes no lock and no claim (docs/architecture.md, "Lock discipline"): nothing a
control-plane operation holds can make it wait. Its only waits are the key service's
answers (each bounded by the client's timeout; no answer is unreachability) and the
drain of the disks it closes, which it waits for at most `drain_bound` seconds, after
the exports are already locked; the DEK is wiped when the last request ends.
"""

from __future__ import annotations

import asyncio
import logging
import time

from daemonkit.latency import Latency
from keyservice.client import KeyServiceError

from . import keys
from .errors import AccessMissing, KeyUnavailable, NotFound
from .model import KeyUrl

log = logging.getLogger("nbdserver.access")


class KeyAccess:
    def __init__(self, platform, *, lease: float = 60.0, grace: float = 3600.0,
                 clock=time.monotonic, drain_bound: float = 1.0):
        self.platform = platform
        self.lease = lease
        self.grace = grace
        self.clock = clock
        self.last_ok: dict[str, float] = {}
        self.cause: dict[str, str] = {}  # disk -> "revoked" | "unreachable"
        self._dirty: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task] = {}
        # (scope, kid) -> the poke at the key's expiry: per scope, as two sets on one key
        # each need theirs, and a deleted set's go with it (`forget`).
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []
        self.stream_connected = False
        self.stream_down_since = clock()  # since when the change stream is not followed
        self.drain_bound = drain_bound
        # For the metrics (nbdserver/metrics.py): disks locked by a refusal, and how long
        # from the start of the check that met it until they were locked.
        self.revocations = 0
        self.revocation_latency = Latency()
        self._started: dict[str, int] = {}  # scope -> rechecks started
        # scope -> when the platform learned it must check it (the change stream's event,
        # the lease, a refused open): where the platform's own share of a revocation or a
        # reopen starts. `recheck` logs that share; bench.scale reads it from the log.
        self._learned: dict[str, float] = {}

    def start(self) -> None:
        now = self.clock()
        for scope in self.scopes():
            self.last_ok.setdefault(scope, now)
        self._tasks = [asyncio.create_task(self._follow_events(), name="key-events"),
                       asyncio.create_task(self._lease_loop(), name="key-lease")]

    async def stop(self) -> None:
        for t in self._tasks + list(self._workers.values()):
            t.cancel()
        for t in self._tasks + list(self._workers.values()):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for h in self._timers.values():
            h.cancel()

    def forget(self, scope: str) -> None:
        """A deleted encryption set: its check (if one runs), expiry timers and counters go,
        so deleted sets leave nothing behind however many come and go."""
        for table in (self.last_ok, self._dirty, self._started, self._learned):
            table.pop(scope, None)
        worker = self._workers.pop(scope, None)
        if worker is not None and not worker.done():
            worker.cancel()
        for key in [k for k in self._timers if k[0] == scope]:
            self._timers.pop(key).cancel()

    def scopes(self) -> set[str]:
        return self.platform.state.disk_scopes()

    # -- triggers
    def poke(self, scope: str) -> None:
        """Ask for a recheck of `scope` soon; bursts of pokes coalesce into one check."""
        self._learned.setdefault(scope, time.monotonic())
        ev = self._dirty.setdefault(scope, asyncio.Event())
        ev.set()
        w = self._workers.get(scope)
        if w is None or w.done():
            self._workers[scope] = asyncio.create_task(self._worker(scope, ev), name=f"recheck-{scope}")

    async def _worker(self, scope: str, ev: asyncio.Event) -> None:
        while ev.is_set():
            ev.clear()
            try:
                await self.recheck(scope)
            except Exception:
                log.exception("recheck of %s failed", scope)

    def scopes_for_event(self, event: dict) -> set[str]:
        vault = event.get("vault")
        out = set()
        for scope in self.scopes():
            try:
                url = KeyUrl.parse(self.platform.key_url_for(scope))
            except Exception:
                continue
            if url.vault == vault:
                out.add(scope)
        return out

    async def _follow_events(self) -> None:
        since = None
        backoff = 0.2

        def opened():
            nonlocal backoff
            self.stream_connected = True
            backoff = 0.2
            log.info("following the key service's change stream")
            # Whatever changed before the stream was up (or while it was down) is caught
            # by a recheck made now, after the stream is established.
            for scope in self.scopes():
                self.poke(scope)
            self.platform.auto_rotation.on_key_event(None)  # versions added meanwhile

        while True:
            try:
                async for event in self.platform.client.events(since, on_open=opened):
                    if event.get("seq") is not None:
                        since = event["seq"]
                    for scope in self.scopes_for_event(event):
                        log.info("key event %s on vault %s: rechecking %s", event.get("type"),
                                 event.get("vault"), scope)
                        self.poke(scope)
                    self.platform.auto_rotation.on_key_event(event)  # a new version to follow
            except asyncio.CancelledError:
                raise
            except (TimeoutError, KeyServiceError, OSError) as e:
                if self.stream_connected:
                    log.warning("change stream lost (%s); the lease re-check covers the gap",
                                getattr(e, "message", None) or e)
                    self.stream_down_since = self.clock()
                self.stream_connected = False
            except Exception:
                log.exception("change stream failed")
                if self.stream_connected:
                    self.stream_down_since = self.clock()
                self.stream_connected = False
            # Retry backoff for a stream that is down: not synchronisation.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease)
            scopes = self.scopes()
            # Routine, every lease: DEBUG, or a quiet server's log would be nothing else.
            log.debug("lease: re-checking the keys of %d scope(s)", len(scopes))
            for scope in scopes:
                self.poke(scope)
            self.platform.auto_rotation.on_key_event(None)  # what the stream missed

    def checks_started(self, scope: str) -> int:
        """How many rechecks of `scope` have started: a disk that starts serving compares
        it with the count before its own key check, to ask for one it may have missed."""
        return self._started.get(scope, 0)

    # -- the check itself
    async def recheck(self, scope: str) -> None:
        p = self.platform
        started = self.clock()
        self._started[scope] = self._started.get(scope, 0) + 1
        learned = self._learned.pop(scope, None) or time.monotonic()
        # Names and one envelope per key version, not whole volumes: on the way to the
        # first lock, and its cost grows with the disks.
        by_kid = p.state.disk_key_groups(scope)
        if not by_kid:
            return
        try:
            client = p.client_for(scope)
        except NotFound:  # the set was deleted since the poke
            return
        reachable = True
        for kid, (envelope, group) in by_kid.items():
            try:
                # The unwrap first: its refusal alone is a revocation (disabled, expired,
                # deleted, permission removed), so disks lock one round trip after the event.
                keys.wipe(await keys.unwrap(client, envelope))
                attrs = await keys.key_attributes(client, kid)
            except AccessMissing as e:
                for name in group:
                    self.cause[name] = "revoked"
                await self._close(kid, group, f"key access revoked: {e.message}", started,
                                  learned=learned)
                continue
            except KeyUnavailable as e:
                reachable = False
                self._unreachable(scope, group, e.message)
                continue
            self._schedule_expiry(scope, kid, attrs)
            locked = [name for name in group
                      if (x := p.catalog.get(name)) is not None and x.locked]
            if locked:
                opened = await p.open_disks(locked)
                for name in locked:
                    export = p.catalog.get(name)
                    if export is not None and not export.locked:
                        self.cause.pop(name, None)
                if opened:
                    log.warning("%d disk(s) of %s: key access restored, serving again %.1f ms "
                                "after the platform learned of it: %s", opened, kid,
                                (time.monotonic() - learned) * 1000, _names(locked))
        if reachable:
            self.last_ok[scope] = self.clock()

    async def _close(self, kid: str, group: list[str], reason: str, started: float, *,
                     learned: float | None = None) -> None:
        """Lock every disk of the group at once (no await between two locks), then give
        their drains `drain_bound` seconds together: a request stuck in the file system
        must not hold up this scope's next check. The drains go on; each wipes its DEK.
        `learned`: when the platform learned of the refusal (see `poke`), for the log line
        that times the platform's share: to every disk locked, and to every DEK wiped."""
        catalog = self.platform.catalog
        newly = sum(1 for name in group if (x := catalog.get(name)) is not None and not x.locked)
        closes = self.platform.close_disks(group, reason)
        if learned is not None and newly:  # a lease check of a revoked key times nothing
            _time_revocation(kid, newly, learned, closes)
        if newly:
            self.revocations += newly
            self.revocation_latency.observe(self.clock() - started)
        if not closes:
            return
        for t in closes:
            t.add_done_callback(_report)
        _, pending = await asyncio.wait(closes, timeout=self.drain_bound)
        if pending:
            log.warning("%d disk(s) locked, still draining in-flight requests after %.1fs; their "
                        "DEKs are wiped when those finish", len(pending), self.drain_bound)

    def _unreachable(self, scope: str, group: list[str], message: str) -> None:
        since = self.clock() - self.last_ok.setdefault(scope, self.clock())
        if since < self.grace:
            log.warning("key service unreachable for %s (%.0fs of the %.0fs grace period); disks "
                        "keep serving on the keys they hold: %s", scope, since, self.grace, message)
            return
        for name in group:
            self.cause[name] = "unreachable"
        for t in self.platform.close_disks(
                group,
                f"key service unreachable for more than the {self.grace:.0f}s grace period"):
            t.add_done_callback(_report)

    def _schedule_expiry(self, scope: str, kid: str, attrs: dict) -> None:
        exp = attrs.get("exp")
        old = self._timers.pop((scope, kid), None)
        if old:
            old.cancel()
        if not exp:
            return
        delay = float(exp) - time.time()
        if delay < 0:
            return
        loop = asyncio.get_running_loop()
        # Just after the expiry instant, so the key service already refuses.
        self._timers[(scope, kid)] = loop.call_later(delay + 0.05, self.poke, scope)


def _names(names: list[str], shown: int = 5) -> str:
    """A log line's list of disks: the first few, then how many more."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _time_revocation(kid: str, disks: int, learned: float, closes: list[asyncio.Task]) -> None:
    """Log how long after `learned` the disks were locked (now: `close_disks` locks them all
    before it returns) and their DEKs wiped (when the last drain ends)."""
    locked = time.monotonic() - learned

    def wiped(_) -> None:
        log.warning("revocation of %s: %d disk(s) locked %.1f ms and wiped %.1f ms after the "
                    "platform learned of it", kid, disks, locked * 1000,
                    (time.monotonic() - learned) * 1000)
    asyncio.gather(*closes, return_exceptions=True).add_done_callback(wiped)


def _report(t: asyncio.Task) -> None:
    if not t.cancelled() and t.exception() is not None:
        log.error("closing a disk failed: %r", t.exception())
