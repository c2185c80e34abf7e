"""Group commit of audit entries (keyservice/api/audit_writer.py and
KeyService.record_many): a call returns only after the transaction holding its entry
committed, entries keep their order, and one entry that cannot be written costs no
other its record."""
import asyncio

import pytest

from keyservice.api.audit_writer import AuditWriter
from keyservice.domain.service import KeyService
from keyservice.store import Store
from keyservice.tokens import TokenSigner


class GatedCommit:
    """A commit that waits for the test's go; remembers every batch it was given."""

    def __init__(self, fail=()):
        self.batches: list[list[dict]] = []
        self.gate = asyncio.Event()
        self.fail = set(fail)

    async def __call__(self, entries):
        self.batches.append(list(entries))
        await self.gate.wait()
        return [ValueError(f"entry {e['n']} refused") if e["n"] in self.fail else None
                for e in entries]


def test_no_call_returns_before_its_batch_commits_and_batches_form_meanwhile():
    async def main():
        commit = GatedCommit()
        writer = AuditWriter(commit)
        first = asyncio.ensure_future(writer.record({"n": 0}))
        await asyncio.sleep(0)  # the writer's task starts its first batch: entry 0 alone
        rest = [asyncio.ensure_future(writer.record({"n": n})) for n in range(1, 6)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert commit.batches == [[{"n": 0}]]
        assert not first.done() and not any(t.done() for t in rest)  # nothing before commit
        commit.gate.set()
        await asyncio.gather(first, *rest)
        # The five that came while the first committed share the next transaction, in order.
        assert commit.batches == [[{"n": 0}], [{"n": n} for n in range(1, 6)]]
        await writer.close()
    asyncio.run(main())


def test_a_failed_entry_fails_its_call_only_and_batches_are_bounded():
    async def main():
        commit = GatedCommit(fail={3})
        commit.gate.set()
        writer = AuditWriter(commit, max_batch=4)
        results = await asyncio.gather(*(writer.record({"n": n}) for n in range(10)),
                                       return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["NoneType"] * 3 + ["ValueError"] + ["NoneType"] * 6
        assert all(len(b) <= 4 for b in commit.batches)
        assert [e["n"] for b in commit.batches for e in b] == list(range(10))
    asyncio.run(main())


def test_a_cancelled_caller_still_gets_its_entry_committed():
    async def main():
        commit = GatedCommit()
        writer = AuditWriter(commit)
        call = asyncio.ensure_future(writer.record({"n": 0}))
        await asyncio.sleep(0)
        call.cancel()
        commit.gate.set()
        await writer.close()
        assert commit.batches == [[{"n": 0}]]
    asyncio.run(main())


@pytest.fixture
def svc(tmp_path):
    store = Store(tmp_path)
    yield KeyService(store, TokenSigner(store.token_key), base_url="https://kv.test")
    store.close()


def test_record_many_commits_in_order_and_keeps_the_chain(svc):
    entries = [{"time": 1.0 + i, "requestId": f"r{i}", "operation": "KeyUnwrap"} for i in range(20)]
    assert svc.record_many(entries) == [None] * 20
    stored = svc.store.audit_entries("", 100)
    assert [e["requestId"] for e in stored] == [f"r{i}" for i in range(20)]
    assert svc.store.verify_audit("").valid


def test_record_many_falls_back_to_one_by_one_so_a_bad_entry_costs_no_other(svc):
    bad = {"time": 2.0, "requestId": "bad", "operation": "KeyUnwrap", "status": object()}  # not JSON
    entries = [{"time": 1.0, "requestId": "a"}, bad, {"time": 3.0, "requestId": "b"}]
    outcomes = svc.record_many(entries)
    assert outcomes[0] is None and outcomes[2] is None and isinstance(outcomes[1], TypeError)
    assert [e["requestId"] for e in svc.store.audit_entries("", 100)] == ["a", "b"]
    assert svc.store.verify_audit("").valid
