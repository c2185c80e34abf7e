"""Input the platform API must refuse with a 400 and a message (issue 19, items 9 and 14).

- Names are matched whole: `data1\\n` is not a second `data1` (a regex's `$` matches
  before a trailing newline, so `re.match(r"^...$")` accepted it).
- A deeply nested JSON body is a bad request, not a RecursionError answered with 500.
"""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("name", ["data1\n", "data1\r\n", "data1\n\n", " data1", "data1 "])
def test_disk_names_are_matched_whole(stack, name):
    status, body = stack.api("POST", "/disks", {"name": name, "size": "1M"})
    assert status == 400, body
    assert "invalid disk name" in body["error"]["message"]
    status, _ = stack.api("GET", "/disks/" + "data1%0A")
    assert status == 404


def test_snapshot_and_set_names_are_matched_whole(stack):
    stack.create_disk("in-src", "--size", "1M")
    status, body = stack.api("POST", "/snapshots", {"name": "s1\n", "disk": "in-src"})
    assert status == 400 and "invalid snapshot name" in body["error"]["message"], body
    status, body = stack.api("POST", "/encryption-sets", {
        "name": "des1\n", "keyUrl": stack.key_url("v", "k")})
    assert status == 400 and "invalid encryption set name" in body["error"]["message"], body
    status, body = stack.api("POST", "/encryption-sets", {
        "name": "desx", "keyUrl": stack.key_url("v", "k") + "\n"})
    assert status == 400 and "not a key URL" in body["error"]["message"], body
    names = [d["name"] for d in stack.api("GET", "/disks")[1]["value"]]
    assert all("\n" not in n for n in names)


@pytest.mark.parametrize("depth", [100_000, 500_000])  # both under the 1 MiB body limit
def test_deeply_nested_json_is_a_bad_request(stack, depth):
    for path in ("/disks", "/snapshots", "/encryption-sets"):
        status, body = stack.api("POST", path, raw=b"[" * depth + b"]" * depth)
        assert status == 400, (path, status, body)
        assert "nested too deeply" in body["error"]["message"]
    stack.nb.assert_healthy()


def test_an_image_of_an_empty_source_is_a_bad_request(stack):
    """`source: ""` passed the API's type check and reached `src.kind` on None: an internal
    error instead of a 400 (found by mypy)."""
    status, body = stack.api("POST", "/images", {"name": "img-empty", "source": ""})
    assert status == 400, body
    assert "needs a source" in body["error"]["message"]
    assert stack.api("GET", "/images/img-empty")[0] == 404
    stack.nb.assert_healthy()
