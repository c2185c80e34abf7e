"""Expensive work never delays revocation (issue 19, item 5), against the real daemon.

The attack: a caller floods the key service with RSA-4096 creations; before, they ran on
the one domain thread that also serves `disable`, so the owner's disable waited behind
seconds of key generation while a revoked disk kept serving. Now generation runs on a
work pool after authorization, admission is limited per identity (429 + Retry-After),
and the domain thread only does short work.
"""
import json
import socket
import time

import pytest

from keyservice.domain import rsakeys

DISABLE_DEADLINE = 2.0  # liveness: the owner's disable answers while the flood runs


def send_raw(d, method, path, body, token) -> socket.socket:
    """Send a whole request on its own connection and return without reading the answer."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", d.port), timeout=120)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
              "Connection: close\r\n\r\n".encode() + data)
    return s


def read_response(s: socket.socket) -> tuple[int, dict, str]:
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body.decode()


def pending(s: socket.socket) -> bool:
    """True while the server has not answered on `s` yet."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    finally:
        s.setblocking(True)


def owner_setup(d):
    assert d.http("POST", "/vaults", {"name": "victim", "location": "l", "subscription": "s"})[0] == 201
    assert d.http("POST", "/vaults/victim/keys/k1/create", {"key_size": 2048})[0] == 200


def timed_disable(d) -> float:
    d.token(d.admin)  # a token in hand: only the disable itself is timed
    t0 = time.monotonic()
    status, body = d.http("PATCH", "/vaults/victim/keys/k1", {"attributes": {"enabled": False}})
    took = time.monotonic() - t0
    assert status == 200 and body["attributes"]["enabled"] is False, body
    return took


def attacker(d, name):
    cred = d.identity(name, type_="user")
    vault = f"flood-{name}"
    assert d.http("POST", "/vaults", {"name": vault, "location": "l", "subscription": "s"}, as_=cred)[0] == 201
    return d.token(cred), vault


def flood(d, attackers, per_attacker):
    return [send_raw(d, "POST", f"/vaults/{vault}/keys/f{i}/create", {"key_size": 4096}, token)
            for i in range(per_attacker) for token, vault in attackers]


def test_one_identitys_rsa4096_flood_does_not_delay_disable(make_daemon):
    d = make_daemon()
    owner_setup(d)
    socks = flood(d, [attacker(d, "eve")], 20)
    took = timed_disable(d)
    answers = [read_response(s) for s in socks]
    assert took < DISABLE_DEADLINE, f"disable took {took:.2f} s behind the key generation flood"
    statuses = [a[0] for a in answers]
    assert statuses.count(200) >= 2, statuses
    refused = [a for a in answers if a[0] == 429]
    assert refused, statuses  # at most a few at once per identity
    status, headers, body = refused[0]
    assert int(headers["retry-after"]) >= 1
    assert json.loads(body)["error"]["code"] == "TooManyRequests"
    assert "retry" in json.loads(body)["error"]["message"]


def test_admitted_generation_runs_off_the_domain_thread(make_daemon):
    """Several identities, each within its limit: every creation is admitted and runs,
    and the disable still answers while they do."""
    d = make_daemon()
    owner_setup(d)
    socks = flood(d, [attacker(d, f"eve{i}") for i in range(6)], 2)
    took = timed_disable(d)
    still_running = sum(pending(s) for s in socks)
    answers = [read_response(s) for s in socks]
    assert took < DISABLE_DEADLINE, f"disable took {took:.2f} s behind admitted key generation"
    assert [a[0] for a in answers] == [200] * len(socks)
    assert still_running, "the creations were over before the disable: the test measured nothing"


@pytest.mark.parametrize("kind", ["pem", "jwk"])
def test_import_is_authorized_before_the_key_is_parsed(make_daemon, kind):
    """An import by a caller without the import permission is refused before its key is
    parsed (an 8192-bit PEM took seconds of OpenSSL checks first); an unsupported size is
    refused before the costly consistency check."""
    d = make_daemon()
    owner_setup(d)
    reader = d.identity("reader")
    assert d.http("PUT", f"/vaults/victim/accessPolicies/{reader.object_id}",
                  {"permissions": {"keys": ["get"]}})[0] == 200
    big = 1 << 8191 | 1  # an 8192-bit modulus; the key does not have to be consistent
    if kind == "pem":
        body = {"pem": "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"}
    else:
        body = {"key": {"kty": "RSA", **{f: rsakeys.b64u_encode(big.to_bytes(1024, "big"))
                                         for f in ("n", "e", "d", "p", "q", "dp", "dq", "qi")}}}
    status, answer = d.http("PUT", "/vaults/victim/keys/imp", body, as_=reader)
    assert status == 403 and answer["error"]["innererror"]["code"] == "AccessDenied", answer
    status, answer = d.http("PUT", "/vaults/victim/keys/imp", body)
    assert status == 400
    if kind == "jwk":
        assert "8192 is not supported" in answer["error"]["message"]
