"""Unauthenticated calls cannot grow a vault's audit chain, and audited fields are capped
(issue 19, item 8), against the real daemon.

The attack: 2000 requests without a valid token, each naming the victim vault and a huge
key name, appended 2000 entries (16 MB) to the victim's chain. Now refusals of calls that
proved no identity are only counted, into the service chain, at most one entry per
(operation, status, error) a second; and every audited value is capped.
"""
import http.client

from tests.helpers.servers import wait_until

HUGE = "k" * 7000  # within aiohttp's request-line limit


def chain_length(d, path):
    """Entries before this call (the verify call is audited after it answers)."""
    status, body = d.http("GET", path + "/verify")
    assert status == 200 and body["valid"], body
    return body["entries"]


def test_unauthenticated_flood_does_not_grow_the_victims_chain(make_daemon):
    d = make_daemon()
    assert d.http("POST", "/vaults", {"name": "victim", "location": "l", "subscription": "s"})[0] == 201
    victim_before = chain_length(d, "/vaults/victim/audit")
    service_before = chain_length(d, "/audit")
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    statuses = set()
    for i in range(2000):
        headers = {"Authorization": "Bearer not.a.token"} if i % 2 else {}
        conn.request("GET", f"/vaults/victim/keys/{HUGE}{i}", headers=headers)
        resp = conn.getresponse()
        resp.read()
        statuses.add(resp.status)
    conn.close()
    assert statuses == {401}
    assert chain_length(d, "/vaults/victim/audit") == victim_before + 1  # the first verify only

    def counted():
        status, body = d.http("GET", f"/audit?after={service_before}&limit=10000")
        return sum(e.get("unauthenticatedCount", 0) for e in body["value"]
                   if e["operation"] == "KeyGet") == 2000 and body["value"]
    entries = wait_until(counted, timeout=10, what="the refusals counted into the service chain")
    # One entry per second per (operation, status, error): a few, never one per request.
    assert len(entries) < 100, len(entries)
    assert all(HUGE not in str(e) for e in entries)


def test_audited_fields_are_capped(make_daemon):
    d = make_daemon()
    assert d.http("POST", "/vaults", {"name": "victim", "location": "l", "subscription": "s"})[0] == 201
    status, _ = d.http("GET", f"/vaults/victim/keys/{HUGE}")
    assert status == 400  # an authenticated caller: audited in the vault's chain, capped
    status, body = d.http("GET", "/vaults/victim/audit")
    last = body["value"][-1]
    assert last["operation"] == "KeyGet" and last["status"] == 400
    assert len(last["key"]) < 300 and last["key"].endswith(f"...[{len(HUGE) - 256} more characters]")
