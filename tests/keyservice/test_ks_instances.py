"""Two `keyservice serve` instances on one PostgreSQL database (issue 15), real daemons
and a real PostgreSQL server (tests/helpers/postgres.py).

Any instance answers for what the other made; the change stream followed on one carries
the other's changes at once (LISTEN/NOTIFY, not the next heartbeat); the audit chain of
a vault written from both stays one verifiable chain; and an instance killed -9 in the
middle of a flood loses nothing it answered.
"""
import http.client
import json
import shutil
import threading

import pytest

from tests.helpers.servers import wait_until
from tests.keyservice.test_ks_audit_durable import audit_of, b64u, unwrapper

HEARTBEAT = "60"  # so only a notification can deliver the other instance's event in time
EVENT_DEADLINE = 10.0
FLOOD = 6  # keep-alive unwrap connections per instance


@pytest.fixture
def pair(make_daemon, postgres_dsn, tmp_path):
    """Instances A and B on one database. B gets A's master key (a copy of the file, as
    docs/operations.md says) and both the same --base-url, the address clients use, so
    kids and token audiences are one service's; B also gets the admin's credential."""
    a = make_daemon(start=False)
    common = ["--state", postgres_dsn, "--base-url", a.url, "--heartbeat", HEARTBEAT]
    a.extra_args = common
    a.start()
    b_dir = tmp_path / "instance-b"
    b_dir.mkdir(mode=0o700)
    for name in ("master-key", "admin.credential"):
        shutil.copy2(a.data_dir / name, b_dir / name)
    b = make_daemon(data_dir=b_dir, extra_args=common)
    return a, b


def new_vault(d, name):
    status, body = d.http("POST", "/vaults", {"name": name, "location": "l", "subscription": "s"})
    assert status == 201, body


def create_key(d, vault, name):
    status, body = d.http("POST", f"/vaults/{vault}/keys/{name}/create", {"kty": "RSA", "key_size": 2048})
    assert status == 200, body
    return body


def test_what_one_instance_made_the_other_serves(pair):
    a, b = pair
    new_vault(a, "shared")
    made = create_key(a, "shared", "k1")
    status, got = b.http("GET", "/vaults/shared/keys/k1")
    assert status == 200, got
    assert got["key"]["kid"] == made["key"]["kid"] and got["key"]["n"] == made["key"]["n"]
    status, wrapped = b.http("POST", "/vaults/shared/keys/k1/wrapkey",
                             {"alg": "RSA-OAEP-256", "value": b64u(b"d" * 64)})
    assert status == 200, wrapped
    status, out = a.http("POST", "/vaults/shared/keys/k1/unwrapkey",
                         {"alg": "RSA-OAEP-256", "value": wrapped["value"]})
    assert status == 200 and out["value"] == b64u(b"d" * 64), out
    # A change on B is what A answers next: no instance keeps a stale copy.
    assert b.http("PATCH", "/vaults/shared/keys/k1", {"attributes": {"enabled": False}})[0] == 200
    status, got = a.http("GET", "/vaults/shared/keys/k1")
    assert status == 200 and got["attributes"]["enabled"] is False, got


def test_a_stream_followed_on_one_instance_carries_the_others_changes(pair):
    a, b = pair
    new_vault(a, "streamed")
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=EVENT_DEADLINE)
    conn.request("GET", "/events", headers={"Authorization": f"Bearer {b.token(b.admin)}"})
    resp = conn.getresponse()
    assert resp.status == 200
    while resp.fp.readline() != b": connected\n":
        pass
    create_key(a, "streamed", "k1")  # on A, while B's subscriber waits
    try:
        seen = None
        while seen is None:  # a read past EVENT_DEADLINE raises: B never heard of it
            line = resp.fp.readline().decode()
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event["type"] == "key.created" and event["vault"] == "streamed":
                    seen = event
    finally:
        conn.close()
    assert seen["kid"].startswith(f"{a.url}/vaults/streamed/keys/k1/")


def test_the_audit_chain_stays_one_chain_with_writers_on_both(pair):
    a, b = pair
    new_vault(a, "audited")
    errors: list = []

    def writer(d, prefix):
        for i in range(4):
            status, body = d.http("POST", f"/vaults/audited/keys/{prefix}{i}/create",
                                  {"kty": "RSA", "key_size": 2048})
            if status != 200:
                errors.append(body)
            d.http("GET", f"/vaults/audited/keys/{prefix}{i}")
    threads = [threading.Thread(target=writer, args=(d, p)) for d, p in ((a, "a"), (b, "b"), (a, "c"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    for d in (a, b):
        entries, verdict = audit_of(d, "audited")
        assert verdict["valid"], verdict
    ops = [e["operation"] for e in entries]
    assert ops.count("KeyCreate") == 12, ops
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))


def test_an_instance_killed_mid_flood_loses_nothing_it_answered(pair):
    a, b = pair
    new_vault(a, "flooded")
    create_key(a, "flooded", "k")
    status, wrapped = a.http("POST", "/vaults/flooded/keys/k/wrapkey",
                             {"alg": "RSA-OAEP-256", "value": b64u(b"x" * 64)})
    assert status == 200, wrapped
    body = json.dumps({"alg": "RSA-OAEP-256", "value": wrapped["value"]})
    answered: dict = {a: [], b: []}
    created: list[str] = []
    errors: list = []
    stop = threading.Event()

    def creator():
        """Keys made on A one after another; a name is noted only once A answered."""
        i = 0
        try:
            while not stop.is_set():
                status, _ = a.http("POST", f"/vaults/flooded/keys/n{i}/create",
                                   {"kty": "RSA", "key_size": 2048})
                if status == 200:
                    created.append(f"n{i}")
                i += 1
        except OSError:
            pass  # A was killed: that call was not answered, so it promises nothing

    threads = [threading.Thread(target=creator)]
    for d in (a, b):
        hdrs, _ = d.request_parts({})
        threads += [threading.Thread(target=unwrapper, args=(d, "/vaults/flooded/keys/k/unwrapkey", body,
                                                             hdrs, answered[d], stop, errors))
                    for _ in range(FLOOD)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answered[a]) >= 100 and len(answered[b]) >= 100 and created,
                   timeout=120, what="both instances busy")
        a.proc.kill()  # -9, in the middle of it
        a.proc.wait()
        before = len(answered[b])
        wait_until(lambda: len(answered[b]) >= before + 20, timeout=60, what="B still answering")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    entries, verdict = audit_of(b, "flooded")
    assert verdict["valid"], verdict
    recorded = {e["requestId"] for e in entries}
    lost = [rid for rid in answered[a] + answered[b] if rid not in recorded]
    assert not lost, f"{len(lost)} of {len(answered[a]) + len(answered[b])} answered calls have no entry"
    for name in created:
        assert b.http("GET", f"/vaults/flooded/keys/{name}")[0] == 200, name
