"""The audit log: a hash chain per scope (a vault's name, or "" for
service-level calls such as token requests).

Each entry's MAC is HMAC-SHA256(audit key, prev_mac || canonical JSON of the
entry including its chain and sequence number). The audit key is derived from
the master key, so someone who can write the database but lacks the master key
cannot re-chain after an edit. The chain head (last seq and MAC) is kept in a
separate row with its own MAC, which is how removing the *last* entries is
detected, not only entries in the middle.
"""
import hashlib
import hmac
import json
from dataclasses import dataclass

GENESIS = b"\x00" * 32


def canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def entry_mac(key: bytes, chain: str, seq: int, prev: bytes, entry: dict) -> bytes:
    body = canonical({"chain": chain, "seq": seq, "entry": entry})
    return hmac.new(key, prev + body, hashlib.sha256).digest()


def head_mac(key: bytes, chain: str, seq: int, last: bytes) -> bytes:
    return hmac.new(key, b"head\x00" + canonical({"chain": chain, "seq": seq}) + last,
                    hashlib.sha256).digest()


@dataclass
class Verification:
    valid: bool
    entries: int
    first_bad_seq: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"valid": self.valid, "entries": self.entries,
                "firstBadSeq": self.first_bad_seq, "reason": self.reason}


def verify(key: bytes, chain: str, rows, head) -> Verification:
    """rows: (seq, entry_json, prev, mac) in seq order; head: (seq, last_mac, mac) or None."""
    prev, expected_seq, count = GENESIS, 1, 0
    for seq, entry_json, stored_prev, mac in rows:
        if seq != expected_seq:
            return Verification(False, count, expected_seq, f"entry {expected_seq} is missing")
        try:
            entry = json.loads(entry_json)
        except ValueError:
            return Verification(False, count, seq, f"entry {seq} is not valid JSON")
        if not hmac.compare_digest(bytes(stored_prev), prev):
            return Verification(False, count, seq, f"entry {seq} does not link to entry {seq - 1}")
        if not hmac.compare_digest(entry_mac(key, chain, seq, prev, entry), bytes(mac)):
            return Verification(False, count, seq, f"entry {seq} was modified")
        prev, expected_seq, count = bytes(mac), expected_seq + 1, count + 1
    if head is None:
        if count:
            return Verification(False, count, None, "the chain head is missing")
        return Verification(True, 0)
    head_seq, head_last, mac = head
    if not hmac.compare_digest(head_mac(key, chain, head_seq, bytes(head_last)), bytes(mac)):
        return Verification(False, count, None, "the chain head was modified")
    if head_seq != count or not hmac.compare_digest(bytes(head_last), prev):
        return Verification(False, count, count + 1,
                            f"the chain ends at entry {count} but its head records {head_seq} entries")
    return Verification(True, count)
