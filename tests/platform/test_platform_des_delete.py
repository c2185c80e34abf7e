"""A deleted encryption set leaves nothing behind in the revocation watcher or in
automatic rotation: sets come and go for the server's whole life, and each used to
leave its lease time, recheck counters, worker and expiry timers in KeyAccess, and its
worker and pending check in AutoRotation, forever."""

from __future__ import annotations

import asyncio
import time

from tests.platform.test_platform_locking import DEADLINE, run


async def _until(cond, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < deadline, f"not within {DEADLINE}s: {what}"
        await asyncio.sleep(0.01)


def test_deleting_a_set_drops_its_entries_in_revocation_and_auto_rotation(keyservice, tmp_path):
    async def body(p, access, gates):
        # An expiry a day away: the recheck schedules its timer (a poke at that instant).
        await asyncio.to_thread(keyservice.keyservice, "key", "update", "cust", "k1", "--expires",
                                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400)))
        await p.create_disks("x", size="1M", des="des1")
        await p.update_des("des1", auto_rotate=True)
        access.poke("des1")
        await _until(lambda: "des1" in access.last_ok and access.checks_started("des1") > 0,
                     "a recheck of des1")
        await _until(lambda: "des1" in p.auto_rotation._workers
                     and p.auto_rotation._workers["des1"].done(), "an auto-rotation check")
        assert [k for k in access._timers if k[0] == "des1"]
        await p.delete_disk("x")
        await p.delete_des("des1")
        tables = {"last_ok": access.last_ok, "dirty": access._dirty, "workers": access._workers,
                  "started": access._started, "learned": access._learned,
                  "rotation dirty": p.auto_rotation._dirty,
                  "rotation workers": p.auto_rotation._workers}
        left = {name: t for name, t in tables.items() if "des1" in t}
        assert not left, left
        assert not [k for k in access._timers if k[0] == "des1"]

    run(keyservice, tmp_path, body)
