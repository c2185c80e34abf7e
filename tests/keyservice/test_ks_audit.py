"""The audit chain: verification catches edits, removals, re-ordering and a cut tail."""
import json

from keyservice.domain import audit

KEY = b"k" * 32


def build(n, chain="v"):
    rows, prev = [], audit.GENESIS
    for seq in range(1, n + 1):
        entry = {"operation": "KeyGet", "n": seq}
        mac = audit.entry_mac(KEY, chain, seq, prev, entry)
        rows.append([seq, audit.canonical(entry).decode(), prev, mac])
        prev = mac
    head = (n, prev, audit.head_mac(KEY, chain, n, prev)) if n else None
    return rows, head


def test_intact_chain_verifies():
    rows, head = build(5)
    assert audit.verify(KEY, "v", rows, head).valid
    assert audit.verify(KEY, "v", [], None).valid


def test_edit_is_detected():
    rows, head = build(5)
    rows[2][1] = json.dumps({"operation": "KeyGet", "n": 99}, sort_keys=True, separators=(",", ":"))
    r = audit.verify(KEY, "v", rows, head)
    assert not r.valid and r.first_bad_seq == 3 and "modified" in r.reason


def test_removal_in_the_middle_is_detected():
    rows, head = build(5)
    del rows[1]
    r = audit.verify(KEY, "v", rows, head)
    assert not r.valid and r.first_bad_seq == 2 and "missing" in r.reason


def test_renumbering_after_removal_is_detected():
    rows, head = build(5)
    del rows[1]
    for i, row in enumerate(rows):
        row[0] = i + 1
    assert not audit.verify(KEY, "v", rows, head).valid


def test_cut_tail_and_missing_head_are_detected():
    rows, head = build(5)
    r = audit.verify(KEY, "v", rows[:4], head)
    assert not r.valid and "head records 5" in r.reason
    assert not audit.verify(KEY, "v", rows, None).valid


def test_chain_without_the_key_cannot_be_rebuilt():
    rows, head = build(3)
    assert not audit.verify(b"x" * 32, "v", rows, head).valid
    assert not audit.verify(KEY, "other-chain", rows, head).valid  # entries are bound to their chain
