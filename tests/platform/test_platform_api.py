"""Bad input to the nbdserver API gets a 4xx with a message, never a 500 or a traceback.

Malformed JSON, wrong types, unknown names, bad sizes, bad names, bad key URLs, a missing
or wrong token. Long operations that fail late (a size the storage cannot hold) fail with
a 4xx status in the operation and leave nothing behind.
"""

from __future__ import annotations

import pytest

from tests.helpers.servers import wait_until

OK_DISK = {"name": "okdisk", "size": "16M"}


def _check_error(status, body, expected):
    assert status == expected, (status, body)
    assert isinstance(body, dict) and body["error"]["message"] and body["error"]["code"], body


@pytest.fixture(scope="module")
def des(stack):
    stack.customer_key("apiv", "k1", "des-api")
    return "des-api"


@pytest.mark.parametrize("token,headers", [
    (None, None),
    ("wrong-token", None),
    (None, {"Authorization": "Bearer "}),
    (None, {"Authorization": "Basic Zm9vOmJhcg=="}),
])
def test_missing_or_wrong_token_is_401(stack, token, headers):
    status, body = stack.api("GET", "/disks", token=token, headers=headers)
    _check_error(status, body, 401)
    status, body = stack.api("POST", "/disks", OK_DISK, token=token, headers=headers)
    _check_error(status, body, 401)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe\x00", b'"a string"', b"null",
                                 b'{"name": "x", "size": NaN}', b"1e999"])
def test_malformed_json_is_400(stack, raw):
    for path in ("/disks", "/encryption-sets", "/snapshots", "/images"):
        status, body = stack.api("POST", path, raw=raw)
        _check_error(status, body, 400)


def test_oversized_body_is_4xx(stack):
    status, body = stack.api("POST", "/disks", raw=b'{"name": "' + b"a" * (2 << 20) + b'"}')
    assert 400 <= status < 500, status


BAD_DISKS = [
    ({"size": "16M"}, 400),                                     # no name
    ({"name": 5, "size": "16M"}, 400),
    ({"name": {"x": 1}, "size": "16M"}, 400),
    ({"name": "../etc", "size": "16M"}, 400),
    ({"name": "", "size": "16M"}, 400),
    ({"name": "a" * 81, "size": "16M"}, 400),
    ({"name": "white space", "size": "16M"}, 400),
    ({"name": "d"}, 400),                                      # no size, no source
    ({"name": "d", "size": 0}, 400),
    ({"name": "d", "size": -4096}, 400),
    ({"name": "d", "size": 4097}, 400),
    ({"name": "d", "size": "10X"}, 400),
    ({"name": "d", "size": "1.5"}, 400),  # a fraction needs a unit (1.5G is fine)
    ({"name": "d", "size": "2P"}, 400),
    ({"name": "d", "size": 1 << 60}, 400),
    ({"name": "d", "size": True}, 400),
    ({"name": "d", "size": [16]}, 400),
    ({"name": "d", "size": 16.0}, 400),
    ({"name": "d", "size": "16M", "count": 0}, 400),
    ({"name": "d", "size": "16M", "count": 1001}, 400),
    ({"name": "d", "size": "16M", "count": "3"}, 400),
    ({"name": "d", "size": "16M", "count": True}, 400),
    ({"name": "d", "size": "16M", "count": 2.5}, 400),
    ({"name": "d", "size": "16M", "diskEncryptionSet": 5}, 400),
    ({"name": "d", "size": "16M", "diskEncryptionSet": "nope"}, 404),
    ({"name": "d", "source": "image:nope"}, 404),
    ({"name": "d", "source": "snapshot:nope"}, 404),
    ({"name": "d", "source": "bogus"}, 400),
    ({"name": "d", "source": "image:"}, 400),
    ({"name": "d", "source": 7}, 400),
    ({"name": "d", "size": "16M", "subscription": ["a"]}, 400),
    ({"name": "d", "size": "16M", "location": 5}, 400),
]


@pytest.mark.parametrize("body,expected", BAD_DISKS)
def test_bad_disk_requests(stack, body, expected):
    status, out = stack.api("POST", "/disks", body)
    _check_error(status, out, expected)


def test_unknown_names_are_404(stack):
    for method, path, body in [
        ("GET", "/disks/nope", None), ("GET", "/disks/nope/key-envelope", None),
        ("PATCH", "/disks/nope", {"platformKey": True}), ("DELETE", "/disks/nope", None),
        ("GET", "/encryption-sets/nope", None), ("DELETE", "/encryption-sets/nope", None),
        ("PATCH", "/encryption-sets/nope", {"keyUrl": "http://x/vaults/v/keys/k"}),
        ("GET", "/snapshots/nope", None), ("DELETE", "/snapshots/nope", None),
        ("GET", "/images/nope", None), ("POST", "/images/nope/share", {"gallery": "g"}),
        ("GET", "/operations/nope", None), ("GET", "/no/such/route", None),
        ("POST", "/snapshots", {"name": "s", "disk": "nope"}),
        ("POST", "/images", {"name": "i", "source": "disk:nope"}),
    ]:
        status, out = stack.api(method, path, body)
        _check_error(status, out, 404)
    status, out = stack.api("PUT", "/disks", {})
    _check_error(status, out, 405)


def test_bad_encryption_set_requests(stack, des):
    url = stack.key_url("apiv", "k1")
    for body, expected in [
        ({"keyUrl": url}, 400),
        ({"name": "s1"}, 400),
        ({"name": "s1", "keyUrl": 5}, 400),
        ({"name": "s1", "keyUrl": "not-a-url"}, 400),
        ({"name": "s1", "keyUrl": "http://127.0.0.1:1/vaults/apiv/keys/k1"}, 400),
        ({"name": "s1", "keyUrl": stack.key_url("nosuchvault", "k1")}, 400),
        ({"name": "s1", "keyUrl": url, "allowCrossSubscription": "yes"}, 400),
        ({"name": "bad name", "keyUrl": url}, 400),
        ({"name": des, "keyUrl": url}, 409),
    ]:
        status, out = stack.api("POST", "/encryption-sets", body)
        _check_error(status, out, expected)
    status, out = stack.api("PATCH", f"/encryption-sets/{des}", {"keyUrl": "nope"})
    _check_error(status, out, 400)
    status, out = stack.api("PATCH", f"/encryption-sets/{des}", {})
    _check_error(status, out, 400)


def test_bad_updates_and_copies(stack, des):
    status, out = stack.api("POST", "/disks", {"name": "apidisk", "size": "16M"})
    assert status == 202, out
    _wait_op(stack, out["id"])
    for body in ({}, {"diskEncryptionSet": des, "platformKey": True}, {"platformKey": "yes"},
                 {"diskEncryptionSet": 1}):
        status, out = stack.api("PATCH", "/disks/apidisk", body)
        _check_error(status, out, 400)
    for path, body, expected in [
        ("/snapshots", {"name": "s"}, 400),
        ("/snapshots", {"name": 1, "disk": "apidisk"}, 400),
        ("/images", {"name": "i", "source": "apidisk"}, 400),
        ("/images/x/share", {}, 400),
    ]:
        status, out = stack.api("POST", path, body)
        _check_error(status, out, expected)
    status, out = stack.api("POST", "/disks", {"name": "apidisk", "size": "16M"})
    _check_error(status, out, 409)


def _wait_op(stack, op_id) -> dict:
    def done():
        status, op = stack.api("GET", f"/operations/{op_id}")
        assert status == 200, op
        return op if op["status"] != "running" else None
    return wait_until(done, 60, interval=0.05, what=f"operation {op_id}")


def test_size_the_storage_cannot_hold_fails_cleanly(stack):
    """1 PiB passes validation but no ext4 file can be that large: the operation fails with
    a 400 and a message, and the name is free again (no half-made disk left behind)."""
    status, out = stack.api("POST", "/disks", {"name": "huge", "size": "1024T"})
    assert status == 202, out
    op = _wait_op(stack, out["id"])
    if op["status"] == "succeeded":  # a file system that holds it (xfs, btrfs): fine too
        stack.api("DELETE", "/disks/huge")
        return
    assert op["error"]["status"] == 400 and "too large" in op["error"]["message"], op
    status, out = stack.api("GET", "/disks/huge")
    _check_error(status, out, 404)
    status, out = stack.api("POST", "/disks", {"name": "huge", "size": "16M"})
    assert status == 202, out
    assert _wait_op(stack, out["id"])["status"] == "succeeded"
