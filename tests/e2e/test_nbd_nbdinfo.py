"""nbdinfo (libnbd's command-line client) sees what the server advertises."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers.images import DISK_SIZE, RO_SIZE, need_tool

pytestmark = pytest.mark.timeout(120)


def nbdinfo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    need_tool("nbdinfo")
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=30, check=check)


def test_list_shows_every_export_with_its_size(server):
    out = json.loads(nbdinfo("--json", "--list", server.uri()).stdout)
    exports = {e["export-name"]: e for e in out["exports"]}
    assert set(exports) == {"disk", "ro"}
    assert exports["disk"]["export-size"] == DISK_SIZE
    assert exports["ro"]["export-size"] == RO_SIZE
    assert exports["ro"]["is_read_only"] is True
    assert exports["disk"]["is_read_only"] is False


def test_size_of_named_and_default_export(server):
    assert nbdinfo("--size", server.uri("disk")).stdout.strip() == str(DISK_SIZE)
    assert nbdinfo("--size", server.uri("ro")).stdout.strip() == str(RO_SIZE)
    # The first export given to the baseline runner is the default ("" name).
    assert nbdinfo("--size", server.uri()).stdout.strip() == str(DISK_SIZE)


@pytest.mark.parametrize("feature", ["flush", "fua", "trim", "zero", "multi-conn", "cache", "fast-zero",
                                     "structured-reply"])
def test_writable_export_can(server, feature):
    # nbdinfo --can X exits 0 when the export supports X, 2 when it does not.
    assert nbdinfo("--can", feature, server.uri("disk"), check=False).returncode == 0


def test_read_only_export(server):
    assert nbdinfo("--is", "read-only", server.uri("ro"), check=False).returncode == 0
    assert nbdinfo("--is", "read-only", server.uri("disk"), check=False).returncode == 2
    for feature in ("trim", "zero", "fua", "fast-zero"):
        assert nbdinfo("--can", feature, server.uri("ro"), check=False).returncode == 2, feature


def test_block_sizes_and_contexts(server):
    out = json.loads(nbdinfo("--json", server.uri("disk")).stdout)
    export = out["exports"][0]
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 << 20
    assert "base:allocation" in export["contexts"]


@pytest.mark.parametrize("export", ["disk", ""])
def test_map_of_a_fresh_sparse_disk_is_one_hole(server, export):
    # The default export ("") must get base:allocation just like its real name.
    out = json.loads(nbdinfo("--json", "--map", server.uri(export)).stdout)
    assert out == [{"offset": 0, "length": DISK_SIZE, "type": 3, "description": "hole,zero"}]
