"""Every state file of both daemons is created 0600, whatever the umask or the data
directory's mode (issue 19, item 10: platform.db and its -wal/-shm were 0644)."""

from __future__ import annotations

import os
import stat

from tests.helpers.platform import Stack


def _loose(root) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                out.append(f"{path} {mode:o}")
    return out


def test_state_files_are_0600_under_a_permissive_umask(tmp_path):
    old = os.umask(0o002)  # the daemons inherit it
    try:
        tmp_path.chmod(0o755)
        stack = Stack(tmp_path / "s").start()
    finally:
        os.umask(old)
    try:
        stack.create_disk("modes", "--size", "1M")
        stack.nbdserver("snapshot", "create", "modes-snap", "--disk", "modes", "--quiet")
        assert (stack.nb_dir / "platform.db-wal").exists()  # the WAL exists while it runs
        assert _loose(stack.nb_dir) == []
        assert _loose(stack.ks_dir) == []
    finally:
        stack.close()
