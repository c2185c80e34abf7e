"""Shared by the host tests: run a tool, skip plainly when the machine lacks what a test needs."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

TIMEOUT = 60


def sh(*argv, check: bool = True, timeout: float = TIMEOUT, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def require_fuse_path() -> None:
    require_root()
    require_tools("nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "e2fsck", "mount", "umount")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is not available")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices are not available")
