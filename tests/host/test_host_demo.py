"""./scripts/demo, the README's first command, exits 0: the whole reference workflow
(vault, key, encryption set, grant, CMK disk, attach via fuse, ext4, key disabled -> EIO,
enabled -> file intact, detach) on real daemons and real devices. It is the real thing."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers.servers import ROOT
from tests.host.hostutil import require_fuse_path

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def test_demo_exits_zero():
    require_fuse_path()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBDSERVER_")}
    p = subprocess.run([ROOT / "scripts/demo"], capture_output=True, text=True, env=env,
                       timeout=280, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"demo exited {p.returncode}\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
    assert "Done: every step did what it should" in p.stdout
    assert "the read failed, as it must" in p.stdout and "the write failed, as it must" in p.stdout
    assert "hello.txt: OK" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
