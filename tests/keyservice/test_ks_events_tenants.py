"""The change stream is scoped by tenant (issue 19, item 7), against the real daemon.

The attack: an admin of another tenant follows `/events?since=0` and receives every
tenant's vault and key names, kids and object ids. Each event now carries its vault's
tenant (stored with it) and a subscriber gets only its own tenant's events.
"""
import http.client
import json
import uuid

from keyservice.client import Credential


def founder(d, name):
    status, body = d.http("POST", "/identities", {"displayName": name, "type": "user",
                                                  "roles": ["admin"], "tenantId": str(uuid.uuid4())})
    assert status == 201, body
    return Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])


def read_until(d, cred, done):
    """Events from the start of the stream until `done(seen)` holds."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("GET", "/events?since=0", headers={"Authorization": f"Bearer {d.token(cred)}"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = []
    while not done(seen):
        line = resp.fp.readline().decode()
        if line.startswith("data:"):
            seen.append(json.loads(line[5:]))
    conn.close()
    return seen


def policy_changes(vault, n):
    return lambda seen: sum(e["type"] == "policy.changed" and e["vault"] == vault for e in seen) >= n


def test_a_subscriber_sees_only_its_own_tenants_events(make_daemon):
    d = make_daemon()
    alice, bob = founder(d, "alice"), founder(d, "bob")
    # Alice's tenant: a key, a disable, a policy; the home tenant: a policy.
    d.http("POST", "/vaults", {"name": "alice-vault", "location": "l", "subscription": "s"}, as_=alice)
    assert d.http("POST", "/vaults/alice-vault/keys/alice-key/create", {"key_size": 2048}, as_=alice)[0] == 200
    d.http("PATCH", "/vaults/alice-vault/keys/alice-key", {"attributes": {"enabled": False}}, as_=alice)
    d.http("PUT", f"/vaults/alice-vault/accessPolicies/{alice.object_id}",
           {"permissions": {"keys": ["get"]}}, as_=alice)
    d.http("POST", "/vaults", {"name": "home-vault", "location": "l", "subscription": "s"})
    d.http("PUT", f"/vaults/home-vault/accessPolicies/{d.admin.object_id}", {"permissions": {"keys": ["get"]}})
    # Bob's tenant: one change, after all of the above; then Alice's last one.
    d.http("POST", "/vaults", {"name": "bob-vault", "location": "l", "subscription": "s"}, as_=bob)
    d.http("PUT", f"/vaults/bob-vault/accessPolicies/{bob.object_id}", {"permissions": {"keys": ["get"]}},
           as_=bob)
    d.http("PUT", f"/vaults/alice-vault/accessPolicies/{alice.object_id}",
           {"permissions": {"keys": ["list"]}}, as_=alice)

    bob_sees = read_until(d, bob, policy_changes("bob-vault", 1))
    assert [(e["type"], e["vault"]) for e in bob_sees] == [("policy.changed", "bob-vault")], bob_sees
    assert bob_sees[0]["tenantId"] == bob.tenant_id

    alice_sees = read_until(d, alice, policy_changes("alice-vault", 2))
    assert [(e["type"], e["vault"]) for e in alice_sees] == [
        ("key.created", "alice-vault"), ("key.disabled", "alice-vault"),
        ("policy.changed", "alice-vault"), ("policy.changed", "alice-vault")], alice_sees

    home_sees = read_until(d, d.admin, policy_changes("home-vault", 1))
    assert [(e["type"], e["vault"]) for e in home_sees] == [("policy.changed", "home-vault")]


def test_events_of_an_older_database_get_their_vaults_tenant(tmp_path):
    import sqlite3

    from keyservice.store import Store
    store = Store(tmp_path)
    with store.transaction():
        store._db.execute("INSERT INTO vaults (name, tenant_id, subscription, location, retention_days, "
                          "purge_protection, owner, created) VALUES ('kept','tenant-a','s','l',90,0,'o',0)")
        for vault in ("kept", "purged"):
            store._db.execute("INSERT INTO events (type, vault, time) VALUES ('vault.deleted', ?, 0)", (vault,))
    store.close()
    db = sqlite3.connect(tmp_path / "keyservice.db")
    db.execute("DROP INDEX events_by_tenant")
    db.execute("ALTER TABLE events DROP COLUMN tenant_id")
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert [e.vault for e in store.events_after(0, 10, "tenant-a")] == ["kept"]
    # A purged vault's old events have no known tenant: no subscriber gets them.
    assert store._db.execute("SELECT tenant_id FROM events WHERE vault='purged'").fetchone()[0] is None
    store.close()
