"""Fixtures for end-to-end tests of the NBD server: real processes, real clients."""

from __future__ import annotations

import pytest

from tests.helpers.images import DISK_SIZE, RO_SIZE, write_ro_pattern
from tests.helpers.servers import BaselineServer, stop_healthy


@pytest.fixture
def server_factory(tmp_path):
    """start(exports) -> a running BaselineServer; at teardown each must be healthy and
    must stop cleanly on SIGTERM (exit 0)."""
    started: list[BaselineServer] = []

    def start(exports: list[str], **kw) -> BaselineServer:
        srv = BaselineServer(tmp_path, exports, name=f"nbdserver{len(started)}", **kw).start()
        started.append(srv)
        return srv

    yield start
    stop_healthy(started)


@pytest.fixture
def ro_image(tmp_path):
    """A 16 MiB image with a known pattern, to serve read-only."""
    path = tmp_path / "ro.img"
    write_ro_pattern(path, RO_SIZE)
    return path


@pytest.fixture
def server(server_factory, tmp_path, ro_image):
    """Exports `disk` (64 MiB sparse, writable, the default) and `ro` (read-only pattern)."""
    return server_factory([f"disk={tmp_path / 'disk.img'},size={DISK_SIZE}", f"ro={ro_image},ro"])
