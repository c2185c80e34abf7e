"""Every answered call has its audit entry, under 32 concurrent unwraps and across a
kill -9 of the key service, against the real daemon (issue 22: audit entries are now
group-committed, several calls' entries in one transaction).

The promise: a call is answered only after its entry is durable. A writer that answered
first and committed later would lose the entries of the calls answered just before the
kill; one that lost or reordered entries in a batch would break the chain.
"""
import base64
import http.client
import json
import os
import threading

from tests.helpers.servers import wait_until

CONCURRENCY = 32


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unwrapper(d, path, body, headers, answered: list, stop: threading.Event, errors: list):
    """Unwrap again and again on one keep-alive connection; note each answered call's id."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        while not stop.is_set():
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            payload = resp.read()
            if resp.status != 200:
                errors.append((resp.status, payload[:200]))
                return
            answered.append(resp.headers["x-ms-request-id"])
    except (OSError, http.client.HTTPException):
        pass  # the daemon was killed: calls without an answer promise nothing
    finally:
        conn.close()


def audit_of(d, vault, page: int = 10000) -> tuple[list[dict], dict]:
    """The chain's entries (up to this call: each read is audited too) and its verdict."""
    entries: list[dict] = []
    while True:
        after = entries[-1]["seq"] if entries else 0
        status, body = d.http("GET", f"/vaults/{vault}/audit?after={after}&limit={page}")
        assert status == 200, body
        entries += body["value"]
        if len(body["value"]) < page:
            break
    status, verdict = d.http("GET", f"/vaults/{vault}/audit/verify")
    assert status == 200, verdict
    return entries, verdict


def run_unwrappers(d, vault, wrapped, until):
    hdrs, _ = d.request_parts({})
    body = json.dumps({"alg": "RSA-OAEP-256", "value": wrapped})
    answered: list[str] = []
    errors: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=unwrapper, args=(d, f"/vaults/{vault}/keys/k/unwrapkey", body,
                                                        hdrs, answered, stop, errors))
               for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    try:
        until(answered)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    return list(answered)


def test_answered_unwraps_survive_kill9_with_their_audit_entries_and_the_chain_verifies(make_daemon):
    d = make_daemon()
    vault = "durable"
    assert d.http("POST", "/vaults", {"name": vault, "location": "l", "subscription": "s"})[0] == 201
    status, key = d.http("POST", f"/vaults/{vault}/keys/k/create", {"kty": "RSA", "key_size": 2048})
    assert status == 200, key
    dek = os.urandom(64)
    status, out = d.http("POST", f"/vaults/{vault}/keys/k/wrapkey",
                         {"alg": "RSA-OAEP-256", "value": b64u(dek)})
    assert status == 200, out

    # 32 at once, all answered: every one is in the chain, once, and the chain verifies.
    calm = run_unwrappers(d, vault, out["value"], lambda a: wait_until(
        lambda: len(a) >= 4 * CONCURRENCY, timeout=60, what="unwraps answered"))
    entries, verdict = audit_of(d, vault)
    ids = [e["requestId"] for e in entries]
    assert verdict["valid"], verdict
    assert len(set(ids)) == len(ids)
    assert set(calm) <= set(ids)

    # Killed while 32 callers keep unwrapping: whatever was answered was recorded first.
    def kill_when_busy(answered):
        wait_until(lambda: len(answered) >= len(calm) + 8 * CONCURRENCY, timeout=60,
                   what="unwraps answered")
        d.proc.kill()
    stormy = run_unwrappers(d, vault, out["value"], kill_when_busy)
    d.proc.wait()
    again = make_daemon(data_dir=d.data_dir)
    entries, verdict = audit_of(again, vault)
    assert verdict["valid"], verdict
    recorded = {e["requestId"] for e in entries}
    missing = [rid for rid in calm + stormy if rid not in recorded]
    assert not missing, f"{len(missing)} of {len(calm) + len(stormy)} answered calls have no entry"
    unwraps = [e for e in entries if e["operation"] == "KeyUnwrap"]
    assert all(e["status"] == 200 for e in unwraps)
