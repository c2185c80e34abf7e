"""Audit chains belong to a vault, not to its name (issue 19, item 6), against the real daemon.

The attack: tenant A's vault is purged; an admin of tenant B creates a vault of the same
name and reads A's audit entries (callers, keys, request ids) from "its" chain. Now each
vault has its own id and chain; purge closes the chain, which only the service's auditors
(admins of the home tenant) read, by the vault's id.
"""
import sqlite3
import uuid

from keyservice.client import Credential
from keyservice.store import Store


def founder(d, name):
    status, body = d.http("POST", "/identities", {"displayName": name, "type": "user",
                                                  "roles": ["admin"], "tenantId": str(uuid.uuid4())})
    assert status == 201, body
    return Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])


def test_a_reused_name_starts_an_empty_chain_and_the_old_one_is_closed(make_daemon):
    d = make_daemon()
    alice, mallory = founder(d, "alice"), founder(d, "mallory")
    assert d.http("POST", "/vaults", {"name": "reused", "location": "l", "subscription": "s"},
                  as_=alice)[0] == 201
    old_id = d.http("GET", "/vaults/reused", as_=alice)[1]["properties"]["vaultId"]
    assert d.http("POST", "/vaults/reused/keys/secret-project/create", {"key_size": 2048}, as_=alice)[0] == 200
    assert d.http("DELETE", "/vaults/reused", as_=alice)[0] == 200
    assert d.http("DELETE", "/deletedvaults/reused", as_=alice)[0] == 204
    # The old chain is not reachable by name any more, not even by an admin.
    assert d.http("GET", "/vaults/reused/audit")[0] == 404

    status, body = d.http("POST", "/vaults", {"name": "reused", "location": "l", "subscription": "s"},
                          as_=mallory)
    assert status == 201 and body["properties"]["vaultId"] != old_id
    status, body = d.http("GET", "/vaults/reused/audit", as_=mallory)
    assert status == 200
    entries = body["value"]
    assert [e["operation"] for e in entries] == ["VaultCreate"], entries
    assert all(e["caller"] == mallory.object_id for e in entries)
    assert "secret-project" not in str(entries) and alice.object_id not in str(entries)
    assert d.http("GET", "/vaults/reused/audit/verify", as_=mallory)[1]["valid"] is True

    # The closed chain: the home tenant's admin reads it by the vault's id, others may not.
    assert d.http("GET", f"/audit?vaultId={old_id}", as_=mallory)[0] == 403
    assert d.http("GET", "/audit", as_=mallory)[0] == 403  # the service chain spans tenants
    status, body = d.http("GET", f"/audit?vaultId={old_id}")
    assert status == 200
    ops = [e["operation"] for e in body["value"]]
    assert ops[0] == "VaultCreate" and "KeyCreate" in ops and ops[-1] == "ChainClosed", ops
    assert d.http("GET", f"/audit/verify?vaultId={old_id}")[1] == {
        "valid": True, "entries": len(ops), "firstBadSeq": None, "reason": None}
    # The purge itself went to the service chain, naming the closed chain's vault id.
    status, body = d.http("GET", "/audit?limit=10000")
    assert any(e["operation"] == "VaultPurge" and e.get("vaultId") == old_id for e in body["value"])
    assert d.http("GET", f"/audit?vaultId={uuid.uuid4()}")[0] == 404
    assert d.http("GET", "/audit?vaultId=nope")[0] == 400


def test_vaults_of_an_older_database_get_ids_and_keep_their_chains(tmp_path):
    store = Store(tmp_path)
    with store.transaction():
        store._db.execute("INSERT INTO vaults (name, tenant_id, subscription, location, retention_days, "
                          "purge_protection, owner, created) VALUES ('oldvault','t','s','l',90,0,'o',0)")
    store.append_audit("oldvault", {"operation": "VaultCreate"})  # chains were keyed by name
    store.close()
    db = sqlite3.connect(tmp_path / "keyservice.db")
    db.execute("ALTER TABLE vaults DROP COLUMN id")
    db.execute("ALTER TABLE vaults DROP COLUMN audit_chain")
    db.commit()
    db.close()
    store = Store(tmp_path)
    v = store.vault("oldvault")
    assert str(uuid.UUID(v.id)) == v.id and v.audit_chain == "oldvault"
    assert store.audit_chain_of(v.id) == "oldvault"
    assert store.verify_audit("oldvault").valid
    store.close()
    assert Store(tmp_path).vault("oldvault").id == v.id  # filled once, not again
