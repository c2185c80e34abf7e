"""Many disks of one key at once (issue 22): a start unwraps nothing, revocation locks them
all before it waits for anything, and a re-enable opens the attached ones again with
several unwraps in flight, never more than the bound, and unwraps nothing for the others.

The platform runs in the test's process over the real key service (a process), as in
test_platform_locking.py, so the test can watch the order in which exports lock and how
many key-service calls are in flight.
"""

from __future__ import annotations

import asyncio

from keyservice.client import Credential
from nbdserver.crypto import XtsLayer
from nbdserver.exports import ExportCatalog
from nbdserver.platform.access import KeyAccess
from nbdserver.platform.service import Platform
from nbdserver.platform.serving import UNWRAP_CONCURRENCY, is_open

DEADLINE = 20.0  # liveness bound; nothing here is timed
N = 24  # more disks than UNWRAP_CONCURRENCY


class CountingClient:
    """Counts the unwrapKey calls in flight at once through one scope's client."""

    def __init__(self, inner, stats):
        self._inner, self._stats = inner, stats

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name != "unwrap_key":
            return attr

        async def call(*args, **kw):
            s = self._stats
            s["now"] += 1
            s["calls"] += 1
            s["max"] = max(s["max"], s["now"])
            try:
                return await attr(*args, **kw)
            finally:
                s["now"] -= 1
        return call


def run(ks, tmp_path, body):
    ks.keyservice("vault", "create", "cust", "--location", "local", "--subscription", "sub1",
                  "--enable-purge-protection")
    ks.keyservice("key", "create", "cust", "k1", "--size", "2048")

    async def main():
        p = Platform(str(tmp_path / "nb"), ExportCatalog(), ks.ks_url,
                     Credential.load(ks.ks.admin_credential))
        await p.start()
        access = KeyAccess(p, drain_bound=1.0)
        p.use_key_access(access)
        stats = {"now": 0, "max": 0, "calls": 0}
        plain = p.scopes.client_for
        p.scopes.client_for = lambda scope: CountingClient(plain(scope), stats)
        try:
            des = await p.create_des("des1", ks.key_url("cust", "k1"))
            await asyncio.to_thread(ks.grant, "cust", des["identity"]["objectId"])
            await p.create_disks("d", size="1M", des="des1", count=N)
            await p.create_disks("spare", size="1M", des="des1")  # never attached
            await body(p, access, stats, [f"d-{i}" for i in range(N)])
        finally:
            await access.stop()
            await p.stop()
        # A restart over the same data exports every disk and unwraps nothing.
        again = Platform(str(tmp_path / "nb"), ExportCatalog(), ks.ks_url,
                         Credential.load(ks.ks.admin_credential))
        stats["calls"] = 0
        plain_again = again.scopes.client_for
        again.scopes.client_for = lambda scope: CountingClient(plain_again(scope), stats)
        await again.start()
        try:
            assert len(list(again.catalog)) == N + 1
            assert stats["calls"] == 0
            assert not any(is_open(e) or e.locked for e in again.catalog)
        finally:
            await again.stop()

    asyncio.run(main())


async def attach_all(p, names):
    """What the server does when a client selects each disk (NBD_OPT_GO)."""
    attached = await asyncio.gather(*(p.catalog.attach(n, object(), peer=("127.0.0.1", 1))
                                      for n in names))
    assert all(e is not None for e in attached)
    return attached


def test_revocation_locks_every_disk_before_any_drain(keyservice, tmp_path):
    async def body(p, access, stats, names):
        exports = await attach_all(p, names)
        layers = [e.backend for e in exports]
        assert all(isinstance(b, XtsLayer) for b in layers)
        locked_at_first_drain = []
        for e in exports:
            e.begin()  # a request in flight on every disk: each drain must wait for it
            plain = e.drained

            async def drained(plain=plain):
                if not locked_at_first_drain:
                    locked_at_first_drain.append(sum(x.locked for x in exports))
                await plain()
            e.drained = drained
        await asyncio.to_thread(keyservice.keyservice, "key", "disable", "cust", "k1")
        # The drains never end while the test holds them: the recheck still returns,
        # after its bounded wait, with every disk locked.
        await asyncio.wait_for(access.recheck("des1"), DEADLINE)
        assert locked_at_first_drain == [N], "a drain began before every disk was locked"
        assert all(e.locked and "revoked" in e.lock_reason for e in exports)
        assert not any(layer._closed for layer in layers)  # their requests still run
        for e in reversed(exports):
            e.end()
        await asyncio.wait_for(_until(lambda: all(layer._closed for layer in layers)), DEADLINE)

    run(keyservice, tmp_path, body)


def test_reenable_reopens_with_bounded_unwraps_in_flight(keyservice, tmp_path):
    async def body(p, access, stats, names):
        assert not is_open(p.catalog.get(names[0]))  # created unattached: no DEK held
        await attach_all(p, names)
        assert 1 < stats["max"] <= UNWRAP_CONCURRENCY, stats
        await asyncio.to_thread(keyservice.keyservice, "key", "disable", "cust", "k1")
        await asyncio.wait_for(access.recheck("des1"), DEADLINE)
        assert all(p.catalog.get(n).locked for n in names + ["spare"])
        await asyncio.to_thread(keyservice.keyservice, "key", "enable", "cust", "k1")
        stats["max"] = stats["calls"] = 0
        await asyncio.wait_for(access.recheck("des1"), DEADLINE)
        assert not any(p.catalog.get(n).locked for n in names + ["spare"])
        assert all(isinstance(p.catalog.get(n).backend, XtsLayer) for n in names)
        # Pipelined (one after another would be 1), and bounded.
        assert 1 < stats["max"] <= UNWRAP_CONCURRENCY, stats
        # The recheck's own unwrap, and one per attached disk: none for the spare.
        assert stats["calls"] == 1 + N, stats
        assert not is_open(p.catalog.get("spare"))

    run(keyservice, tmp_path, body)


async def _until(cond, interval: float = 0.01):
    while not cond():
        await asyncio.sleep(interval)
