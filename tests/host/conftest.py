"""Host integration tests: real daemons (tests/helpers/platform.py `Stack`), real tools
(nbdfuse, losetup, mkfs.ext4, e2fsck, systemd-analyze, ip netns), no mocks.

Each test module that attaches disks points NBDSERVER_RUN_DIR at its own temporary
directory, so its attachment records never mix with a real host's /run/nbdserver.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.platform import Stack


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """This module's attachment records (NBDSERVER_RUN_DIR), for the CLIs it runs."""
    d = tmp_path_factory.mktemp("run")
    old = os.environ.get("NBDSERVER_RUN_DIR")
    os.environ["NBDSERVER_RUN_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("NBDSERVER_RUN_DIR", None)
    else:
        os.environ["NBDSERVER_RUN_DIR"] = old


@pytest.fixture(scope="module")
def stack(tmp_path_factory, run_dir):
    """Both daemons; a customer-managed key `cust/k1` behind encryption set `des1`."""
    with Stack(tmp_path_factory.mktemp("stack"), lease=1, grace=3) as s:
        s.customer_key("cust", "k1", "des1")
        yield s
        s.assert_healthy()
