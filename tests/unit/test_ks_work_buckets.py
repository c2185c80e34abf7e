"""Admission of expensive key-service work (keyservice/api/work.py): the per-identity
token buckets stay bounded however many identities ever made a key, and forgetting the
refilled ones changes no answer."""

from __future__ import annotations

import asyncio

import pytest

from keyservice.api.work import BUCKETS, ExpensiveWork, WorkLimits
from keyservice.domain.errors import TooManyRequests


def test_refilled_buckets_are_forgotten_and_a_spent_one_still_limits():
    now = [1000.0]
    limits = WorkLimits()
    work = ExpensiveWork(limits, clock=lambda: now[0])

    async def run(who: str, units: float) -> None:
        await work.run(who, "create", units, lambda: None)

    async def scenario() -> None:
        for i in range(3 * BUCKETS):  # identities that each made a key once
            await run(f"old-{i}", 1.0)
        # Long enough for every bucket to refill: they are all the same as new ones.
        now[0] += limits.burst / limits.rate + 1
        await run("hot", limits.burst)  # spends its whole burst
        for i in range(3 * BUCKETS):
            await run(f"new-{i}", 1.0)
        with pytest.raises(TooManyRequests):  # still limited: its bucket was not forgotten
            await run("hot", 1.0)

    try:
        asyncio.run(scenario())
    finally:
        work.shutdown()
    # 6 * BUCKETS identities came; the buckets kept are the lately spent ones.
    assert len(work._buckets) <= 4 * BUCKETS
    assert not any(who.startswith("old-") for who in work._buckets)
