"""Automatic key rotation: an encryption set that follows its key's latest version.

Azure's "auto key rotation" (`rotationToLatestKeyVersionEnabled`): once the key's owner
adds a version (`keyservice key rotate`), every volume of the set gets its DEK re-wrapped
under that version. The DEK itself does not change, so no data is re-encrypted, and an
attached disk keeps serving on the DEK it holds: nothing is locked, closed or reopened.
Once every volume is on the new version, the old one may be disabled without effect.

Triggers, handed over by `KeyAccess` (the same change stream and lease as revocation):
- an event of the change stream on the set's vault and key (`key.rotated`, and also
  `key.enabled`, `policy.changed`: what may let a failed attempt succeed): a check
  within seconds of the owner's call;
- the stream (re)opened, and every lease (`--lease-seconds`): a check of every set that
  follows its key, for whatever the stream missed while it was down.

A check asks the key service, with the set's own identity, for the key's latest version
(`get` on the versionless URL). If a volume is wrapped under another version, or the set
has not recorded that one as active yet, it runs one operation (`operation list/show`,
kind `encryptionSetKeyRotation`). The operation claims the set's key as a manual rotation
does (a move or a manual rotation meanwhile is refused with 409, and one in progress makes
this check give way), probes the new version with a wrap and an unwrap (a version the set
could wrap with but not unwrap with would lock its disks at their next attach), then
re-wraps at most `CONCURRENCY` DEKs at once, and records the active version and the time.

A failure (a permission missing, the version disabled, the key service unreachable) is
recorded on the set (`des show`: `autoKeyRotationError`) and logged; the volumes already
re-wrapped stay so (each envelope changes alone, and both versions are usable), the others
keep the old version, and the next event or lease check tries again.

Who can make a set rotate: only whoever may add a version to its key. An event is only a
reason to look; what the set is re-wrapped to is what the key service tells the set's own
identity about the set's own key. An event on another vault that merely shares the name
costs one `get`, and bursts of events coalesce into one check per set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from daemonkit.rfc3339 import format_time

from . import keys
from . import operations as ops
from .errors import AccessMissing, PlatformError
from .model import EncryptionSet, KeyUrl, Volume

if TYPE_CHECKING:
    from .service import Platform

log = logging.getLogger("nbdserver.platform")

KIND = "encryptionSetKeyRotation"  # the operation's kind in `operation list`
# Re-wraps in flight per set: each is an unwrap and a wrap on the key service, whose RSA
# private-key work is the cost; more would queue there and starve revocation's own checks.
CONCURRENCY = 8


class AutoRotation:
    def __init__(self, platform: Platform, *, concurrency: int = CONCURRENCY):
        self.platform = platform
        self.concurrency = concurrency
        self._dirty: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._stopped = False

    # -- triggers
    def on_key_event(self, event: dict | None) -> None:
        """An event of the key service's change stream, or None for "check every set"
        (the stream has just opened, or a lease has passed)."""
        for des in self.platform.state.list_des():
            if des.auto_rotate and (event is None or _concerns(des, event)):
                self.poke(des.name)

    def poke(self, name: str) -> None:
        """Check `name` soon; pokes during a check coalesce into one more check after it."""
        if self._stopped:  # the platform is stopping: its state is about to close
            return
        ev = self._dirty.setdefault(name, asyncio.Event())
        ev.set()
        w = self._workers.get(name)
        if w is None or w.done():
            self._workers[name] = asyncio.create_task(self._worker(name, ev),
                                                      name=f"auto-rotation-{name}")

    def forget(self, name: str) -> None:
        """A deleted encryption set: its pending check and its worker go with it."""
        self._dirty.pop(name, None)
        worker = self._workers.pop(name, None)
        if worker is not None and not worker.done():
            worker.cancel()

    async def _worker(self, name: str, ev: asyncio.Event) -> None:
        while ev.is_set():
            ev.clear()
            try:
                await self.check(name)
            except Exception:
                log.exception("automatic key rotation check of encryption set %s failed", name)

    async def stop(self) -> None:
        self._stopped = True
        workers = list(self._workers.values())
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    # -- the check
    async def check(self, name: str) -> None:
        p = self.platform
        des = p.state.get_des(name)
        if des is None or not des.auto_rotate:
            return
        try:
            latest = await keys.latest_version(p.client_for(name), KeyUrl.parse(des.key_url).versionless)
        except PlatformError as e:
            self._failed(des, e)
            return
        stale = self._stale(name, latest)
        if not stale and des.active_key_url in (latest, None):
            # Every volume is on the latest version already (done by a manual rotation, or
            # all made since): nothing to re-wrap, no rotation to record, no error left.
            if des.active_key_url is None or des.rotation_error is not None:
                p.state.set_des_rotation(name, active_key_url=latest, rotated=None, error=None)
            return
        started: list[asyncio.Task] = []

        def start(progress) -> asyncio.Task:
            task = p.operations.start(
                f"automatic key rotation of encryption set {name!r}",
                lambda: self._rotate(name, latest, progress),
                exclusive=[ops.key_of(name)], shared=[ops.scope(name)],
                deadline=ops.DEADLINE * (1 + len(stale) / 10))
            started.append(task)
            return task
        try:
            op = p.oplog.start(KIND, name, start)
        except ops.Busy as e:
            # A manual update or a move holds the key: not the key's failure. An update
            # pokes this set when it ends (`update_des`); else the next event or lease.
            log.info("automatic key rotation of encryption set %s waits: %s", name, e.message)
            return
        except PlatformError as e:
            self._failed(des, e)
            return
        log.info("automatic key rotation of encryption set %s to %s: %d volume(s) to re-wrap "
                 "(operation %s)", name, latest, len(stale), op["id"], extra={"operation": op["id"]})
        try:
            await ops.finish(started[0])
        except PlatformError as e:
            self._failed(des, e)

    def _stale(self, name: str, latest: str) -> list[Volume]:
        return [v for v in self.platform.state.list_volumes(des=name) if v.envelope.kid != latest]

    def _failed(self, des: EncryptionSet, e: PlatformError) -> None:
        """Recorded on the set and logged; the volumes keep the version they are on."""
        now = time.time()
        old = des.active_key_url or "their current version"
        log.warning("automatic key rotation of encryption set %s failed, its volumes keep %s "
                    "(the next key event or lease check retries): %s", des.name, old, e.message)
        self.platform.state.set_des_rotation(
            des.name, active_key_url=None, rotated=None,
            error={"code": e.code, "message": e.message, "time": format_time(now)})

    async def _rotate(self, name: str, latest: str, progress) -> dict:
        p = self.platform
        des = p._des(name)
        access = await p.check_access(name, latest)
        if not access["granted"]:
            raise AccessMissing(
                f"encryption set {name!r} identity {des.identity_object_id} cannot use the key's "
                f"latest version {latest}: {', '.join(access['missing'])} refused "
                f"({'; '.join(access['messages'])}); the vault owner must grant get, wrapKey, "
                "unwrapKey on an enabled version")
        client = p.client_for(name)
        stale = self._stale(name, latest)
        done = await self._rewrap_all(stale, client, latest, progress)
        # A versioned key URL is where new volumes are wrapped: it moves with the set. One
        # made meanwhile under the previous version is caught by the second pass.
        des = p._des(name)
        if KeyUrl.parse(des.key_url).version is not None and des.key_url != latest:
            des.key_url = latest
            p.state.put_des(des)
        done += await self._rewrap_all(self._stale(name, latest), client, latest, None)
        now = time.time()
        p.state.set_des_rotation(name, active_key_url=latest, rotated=now, error=None)
        if p.access is not None:
            p.access.poke(name)  # the new version's expiry timer, and a check on it
        log.info("automatic key rotation of encryption set %s: %d volume(s) re-wrapped to %s",
                 name, done, latest)
        return {"encryptionSet": name, "activeKey": {"keyUrl": latest}, "rewrapped": done,
                "lastKeyRotationTimestamp": format_time(now)}

    async def _rewrap_all(self, volumes: list[Volume], client, latest: str, progress) -> int:
        """Re-wrap every volume, at most `concurrency` at once. A volume whose own envelope
        is refused is left as it is and named in the error raised at the end; any other
        failure (unreachable, the deadline) cancels the rest at once (each re-wrap is all
        or nothing: a cancelled one wipes its DEK) and is raised. Returns how many were
        re-wrapped."""
        if not volumes:
            return 0
        limit = asyncio.Semaphore(self.concurrency)
        done = 0
        refused: list[str] = []

        async def one(v: Volume) -> None:
            nonlocal done
            async with limit:
                try:
                    if await self.platform._rewrap(v, client, client, latest):
                        done += 1
                except AccessMissing as e:
                    # This volume's own version refuses its unwrap (disabled, say): it is
                    # locked anyway, and must not keep the others on the old version.
                    refused.append(f"{v.kind.value} {v.name}: {e.message}")
            if progress is not None:
                progress((done + len(refused)) / len(volumes))
        tasks = [asyncio.create_task(one(v)) for v in volumes]
        try:
            finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in finished:
            if not t.cancelled() and (error := t.exception()) is not None:
                raise error  # unreachable, a deadline: what is left waits for the next try
        if refused:
            raise AccessMissing(f"{len(refused)} volume(s) could not be re-wrapped to {latest} "
                                f"and keep their version: {'; '.join(refused[:5])}")
        return done


def _concerns(des: EncryptionSet, event: dict) -> bool:
    """An event on the set's vault that names its key, or no key (a policy change)."""
    try:
        ku = KeyUrl.parse(des.key_url)
    except PlatformError:
        return False
    return event.get("vault") == ku.vault and event.get("key") in (None, ku.key)
