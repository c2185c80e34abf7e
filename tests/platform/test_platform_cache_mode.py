"""A disk's cache mode: `disk create --cache none|writeback`, else `serve --cache`.

The mode is the disk's (kept with it, shown by `disk show` with where it came from) and
takes effect when a client attaches: the server's descriptor on the disk's file has
O_DIRECT exactly for cache=none (read from /proc/PID/fdinfo). Bad values are 400s.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.test_nbd_cache_none import O_DIRECT, open_flags

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = pytest.mark.timeout(180)
S = 4096


def disk_file(stack, name: str) -> str:
    return os.path.join(stack.nb_dir, stack.disk(name)["file"])


def test_a_disks_own_mode_wins_over_the_servers_and_takes_effect_on_attach(make_stack):
    stack = make_stack(nbd_args=["--cache", "none"])
    stack.create_disk("direct", "--size", "4M")
    stack.create_disk("buffered", "--size", "4M", "--cache", "writeback")
    assert stack.disk("direct")["cache"] == {"mode": "none", "source": "server default"}
    assert stack.disk("buffered")["cache"] == {"mode": "writeback", "source": "disk"}
    data = os.urandom(3 * S)
    for name, direct in (("direct", True), ("buffered", False)):
        h = stack.connect(name)
        try:
            h.pwrite(data, S)
            h.flush()
            assert h.pread(len(data), S) == data
            flags = open_flags(stack.nb.pid, disk_file(stack, name))
            assert flags, f"the server holds no descriptor on {name}'s file"
            assert all(bool(f & O_DIRECT) == direct for f in flags), (name, [oct(f) for f in flags])
        finally:
            h.shutdown()
    # The same disk, the server's default changed: a disk with its own mode keeps it.
    stack.nbd_args = ["--cache", "writeback"]
    stack.restart_nbdserver()
    assert stack.disk("direct")["cache"] == {"mode": "writeback", "source": "server default"}
    assert stack.disk("buffered")["cache"] == {"mode": "writeback", "source": "disk"}
    h = stack.connect("direct")
    try:
        assert h.pread(len(data), S) == data  # written through O_DIRECT, read buffered
    finally:
        h.shutdown()


def test_cache_none_per_disk_and_bad_values(stack):
    stack.create_disk("cn1", "--size", "4M", "--cache", "none")
    assert stack.disk("cn1")["cache"] == {"mode": "none", "source": "disk"}
    for bad in ("sometimes", 5, ["none"]):
        status, body = stack.api("POST", "/disks", {"name": "cn-bad", "size": "4M", "cache": bad})
        assert status == 400, body
        assert "cache" in body["error"]["message"]
