"""`Export.drained()` and `frozen()` with more than one waiter at once.

The platform waits for an export's in-flight requests from several places that can
overlap: a revocation, a delete and a snapshot's freeze of the same disk. Each waiter
must be woken when the last request ends, however many there are.
"""

from __future__ import annotations

import asyncio

from nbdserver.exports import Export
from nbdserver.platform.sealed import SealedBackend

DEADLINE = 5.0  # a liveness bound: a waiter that is never woken fails here, not in CI's timeout


def _export() -> Export:
    return Export("d", SealedBackend(1 << 20))


def test_two_waiters_on_one_drain_both_return():
    async def main():
        e = _export()
        e.begin()
        first = asyncio.create_task(e.drained())
        second = asyncio.create_task(e.drained())
        await asyncio.sleep(0)  # both are waiting now (one loop turn, not a timing guess)
        assert not first.done() and not second.done()
        e.end()
        await asyncio.wait_for(asyncio.gather(first, second), DEADLINE)

    asyncio.run(main())


def test_many_waiters_across_two_busy_periods():
    async def main():
        e = _export()
        e.begin()
        e.begin()
        early = [asyncio.create_task(e.drained()) for _ in range(5)]
        await asyncio.sleep(0)
        e.end()
        await asyncio.sleep(0)
        assert not any(t.done() for t in early)  # one request still runs
        e.end()
        await asyncio.wait_for(asyncio.gather(*early), DEADLINE)
        e.begin()  # a second busy period: new waiters, the old ones are gone
        late = [asyncio.create_task(e.drained()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(t.done() for t in late)
        e.end()
        await asyncio.wait_for(asyncio.gather(*late), DEADLINE)

    asyncio.run(main())


def test_two_freezes_and_a_drain_of_one_export():
    async def main():
        e = _export()
        e.begin()
        resumed = []
        entered = asyncio.Event()
        release = asyncio.Event()

        async def snapshot():
            async with e.frozen():
                entered.set()
                await release.wait()

        a, b = asyncio.create_task(snapshot()), asyncio.create_task(snapshot())
        d = asyncio.create_task(e.drained())
        await asyncio.sleep(0)
        assert e.is_frozen
        e.park(lambda: resumed.append(1))  # a request that arrived while frozen
        e.end()
        await asyncio.wait_for(asyncio.gather(d, entered.wait()), DEADLINE)
        release.set()
        await asyncio.wait_for(asyncio.gather(a, b), DEADLINE)
        assert not e.is_frozen and resumed == [1]

    asyncio.run(main())
