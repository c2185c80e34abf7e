"""The platform's lock discipline, cause by cause, with the interleavings forced.

The platform runs in the test's process over the real key service (a process); its
key-service clients are wrapped so that one chosen call waits at a gate the test opens.
That makes each interleaving of the issue happen every time, not by chance:

- two opposite moves (platform key -> des1 and des1 -> platform key) while creations
  hold each scope: they used to take the two scope locks in opposite orders and
  deadlock, stopping every later operation in both scopes;
- a revocation while a move is in its key-service call: the recheck used to wait for
  the scope lock the move held, so a disabled key kept a disk serving;
- a second operation on a name that one is working on: refused at once with 409 naming
  it; and an operation past its deadline fails and leaves nothing half-done.
"""

from __future__ import annotations

import asyncio

import pytest

from keyservice.client import Credential
from nbdserver.exports import ExportCatalog
from nbdserver.platform.access import KeyAccess
from nbdserver.platform.model import PLATFORM_KEY, VolumeKind
from nbdserver.platform.operations import Busy, TimedOut
from nbdserver.platform.sealed import SealedBackend
from nbdserver.platform.service import Platform

DEADLINE = 10.0  # liveness bound for what must not wait at all; a wait fails the test here


class Gate:
    """Holds the first matching key-service call until released."""

    def __init__(self, method: str, scope: str | None = None, wrapped: bytes | None = None):
        self.method, self.scope, self.wrapped = method, scope, wrapped
        self.entered = asyncio.Event()
        self.released = asyncio.Event()
        self.armed = True

    def matches(self, method, scope, args) -> bool:
        if not self.armed or method != self.method:
            return False
        if self.scope is not None and scope != self.scope:
            return False
        if self.wrapped is not None and bytes(args[1]) != self.wrapped:
            return False
        self.armed = False
        return True


class GatedClient:
    def __init__(self, inner, scope, gates):
        self._inner, self._scope, self._gates = inner, scope, gates

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in ("wrap_key", "unwrap_key", "get_key"):
            return attr

        async def call(*args, **kw):
            for g in list(self._gates):
                if g.matches(name, self._scope, args):
                    g.entered.set()
                    await g.released.wait()
            return await attr(*args, **kw)
        return call


def run(keyservice, tmp_path, body):
    """Start a platform over the key service with a set des1 (on vault cust, key k1)
    granted to its identity, then run `body(platform, access, gates)`."""
    ks = keyservice
    ks.keyservice("vault", "create", "cust", "--location", "local", "--subscription", "sub1",
                  "--enable-purge-protection")
    ks.keyservice("key", "create", "cust", "k1", "--size", "2048")

    async def main():
        p = Platform(str(tmp_path / "nb"), ExportCatalog(), ks.ks_url,
                     Credential.load(ks.ks.admin_credential))
        await p.start()
        access = KeyAccess(p, drain_bound=1.0)
        p.use_key_access(access)
        gates: list[Gate] = []
        plain = p.scopes.client_for
        p.scopes.client_for = lambda scope: GatedClient(plain(scope), scope, gates)
        try:
            des = await p.create_des("des1", ks.key_url("cust", "k1"))
            await asyncio.to_thread(ks.grant, "cust", des["identity"]["objectId"])
            await body(p, access, gates)
        finally:
            for g in gates:
                g.released.set()
            await access.stop()
            await p.stop()

    asyncio.run(main())


def serving(p: Platform, name: str) -> bool:
    e = p.catalog.get(name)
    return e is not None and not e.locked  # open on attach: no layer until a client comes


def test_opposite_moves_while_creations_hold_both_scopes(keyservice, tmp_path):
    async def body(p, access, gates):
        await p.create_disks("a", size="1M", subscription="sub1")
        await p.create_disks("b", size="1M", des="des1")
        hold_p, hold_d = Gate("wrap_key", PLATFORM_KEY), Gate("wrap_key", "des1")
        gates += [hold_p, hold_d]
        creating = [asyncio.ensure_future(p.create_disks("c-p", size="1M", subscription="sub1")),
                    asyncio.ensure_future(p.create_disks("c-d", size="1M", des="des1"))]
        await asyncio.wait_for(asyncio.gather(hold_p.entered.wait(), hold_d.entered.wait()), DEADLINE)
        # Both creations are inside their key-service calls. Opposite moves now: neither
        # may wait for the creations, nor for each other.
        moves = [asyncio.ensure_future(p.update_disk("a", des="des1")),
                 asyncio.ensure_future(p.update_disk("b", platform_key=True))]
        await asyncio.wait_for(asyncio.gather(*moves), DEADLINE)
        hold_p.released.set()
        hold_d.released.set()
        await asyncio.wait_for(asyncio.gather(*creating), DEADLINE)
        assert p.state.get_volume(VolumeKind.DISK, "a").des == "des1"
        assert p.state.get_volume(VolumeKind.DISK, "b").des == PLATFORM_KEY
        for name in ("a", "b", "c-p", "c-d"):
            assert serving(p, name), name
        assert p.operations.running == []
        # Later operations in both scopes are not stuck behind anything.
        await asyncio.wait_for(asyncio.gather(p.update_disk("a", platform_key=True),
                                              p.update_disk("b", des="des1")), DEADLINE)

    run(keyservice, tmp_path, body)


def test_recheck_locks_a_disk_while_a_move_is_in_its_key_call(keyservice, tmp_path):
    async def body(p, access, gates):
        await p.create_disks("m", size="1M", des="des1")
        await p.create_disks("u", size="1M", des="des1")  # in use, nothing to do with the move
        held = Gate("unwrap_key", "des1", p.state.get_volume(VolumeKind.DISK, "m").envelope.wrapped)
        gates.append(held)
        move = asyncio.ensure_future(p.update_disk("m", platform_key=True))
        await asyncio.wait_for(held.entered.wait(), DEADLINE)
        await asyncio.to_thread(keyservice.keyservice, "key", "disable", "cust", "k1")
        # The move is inside its unwrap (it used to hold both scope locks here).
        await asyncio.wait_for(access.recheck("des1"), DEADLINE)
        for name in ("u", "m"):
            e = p.catalog.get(name)
            assert e.locked and isinstance(e.backend, SealedBackend), name
            assert "revoked" in e.lock_reason
        held.released.set()
        with pytest.raises(Exception) as failed:  # the key is disabled: the move is refused
            await asyncio.wait_for(move, DEADLINE)
        assert getattr(failed.value, "status", None) == 403, failed.value
        assert p.state.get_volume(VolumeKind.DISK, "m").des == "des1"  # nothing half-done
        assert p.operations.running == []

    run(keyservice, tmp_path, body)


def test_busy_names_are_refused_and_deadlines_undo(keyservice, tmp_path):
    async def body(p, access, gates):
        await p.create_disks("m", size="1M", subscription="sub1")
        before = p.state.get_volume(VolumeKind.DISK, "m")
        held = Gate("wrap_key", "des1")
        gates.append(held)
        p.operations.deadline = 1.0
        move = p.update_disk("m", des="des1")
        await asyncio.wait_for(held.entered.wait(), DEADLINE)
        for second in (lambda: p.delete_disk("m", force=True),
                       lambda: p.update_disk("m", des="des1"),
                       lambda: p.create_snapshot("s", "m"),
                       lambda: p.delete_des("des1")):
            with pytest.raises(Busy) as refused:
                second()
            assert refused.value.status == 409
            assert "in progress" in refused.value.message
        assert "move of disk 'm'" in str(refused.value) or "encryption set 'des1'" in str(refused.value)
        with pytest.raises(Busy, match="move of disk 'm' to encryption set 'des1' is in progress"):
            p.delete_disk("m", force=True)
        # Never released: the deadline ends the move, and nothing of it remains.
        with pytest.raises(TimedOut, match="move of disk 'm'.*deadline"):
            await asyncio.wait_for(move, DEADLINE)
        after = p.state.get_volume(VolumeKind.DISK, "m")
        assert (after.des, after.envelope) == (before.des, before.envelope)
        assert serving(p, "m") and p.operations.running == []
        p.operations.deadline = 60.0
        await asyncio.wait_for(p.delete_disk("m", force=True), DEADLINE)  # the name is free again
        assert p.catalog.get("m") is None and p.state.get_volume(VolumeKind.DISK, "m") is None

    run(keyservice, tmp_path, body)
