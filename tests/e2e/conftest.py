"""Fixtures for end-to-end tests of the NBD server: real processes, real clients."""

from __future__ import annotations

import pytest

from tests.helpers.images import DISK_SIZE, RO_SIZE, write_ro_pattern


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
