"""Where a volume's file lies, and whether it can be served.

The state database names a volume's file relative to the data directory
(`disks/<uuid>.img`), never absolutely: a data directory that is moved, mounted
elsewhere or restored from a backup into another place keeps naming its own files. The
first releases stored the path as given, absolute or relative to the daemon's working
directory; `layout_path` turns such a path back into the data directory's layout (the
platform only ever made files there), which the state's migration uses.

A volume on Ceph RBD (`nbdserver serve --storage rbd:POOL`, platform/storage.py) is named
`rbd:POOL/IMAGE` instead, kept as it is: it names no file, and the data directory's
place does not matter to it.

A disk whose file is missing, not a regular file, not readable and writable, or shorter
than the disk is *failed*: it is listed as such with the reason, refused to NBD clients
like any unavailable export, and the other disks serve.
"""

from __future__ import annotations

import os
import stat

_LAYOUT_FOLDERS = ("disks", "snapshots", "images")
RBD_SCHEME = "rbd:"  # rbdbackend.SCHEME, spelt here so that file volumes never import librbd


def is_rbd(stored: str) -> bool:
    """The volume is an RBD image (`rbd:POOL/IMAGE`), not a file."""
    return stored.startswith(RBD_SCHEME)


def stored_path(data_dir: str, path: str) -> str:
    """What the state database keeps for `path`: relative when under `data_dir`."""
    if is_rbd(path):
        return path
    rel = os.path.relpath(path, data_dir)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return path  # outside the data directory: the platform makes no such file
    return rel


def resolved_path(data_dir: str, stored: str) -> str:
    """The file a stored path names (an absolute stored path is kept as it is)."""
    if is_rbd(stored):
        return stored
    return os.path.join(data_dir, stored)


def layout_path(stored: str) -> str | None:
    """`disks/<name>.img` for any path whose last two parts are the data directory's
    layout (an absolute or working-directory-relative path of an older release), else
    None."""
    folder, name = os.path.split(os.path.normpath(stored))
    if os.path.basename(folder) in _LAYOUT_FOLDERS and name.endswith(".img"):
        return os.path.join(os.path.basename(folder), name)
    return None


def problem(path: str, size: int) -> str | None:
    """Why the file at `path` cannot back a volume of `size` bytes, or None. An RBD
    image is not examined here (that is a round trip to the cluster, and listings call
    this for every disk): an image that cannot be opened fails its attach, logged."""
    if is_rbd(path):
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"backing file {path} is missing"
    except OSError as e:
        return f"backing file {path} cannot be examined: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"backing file {path} is not a regular file"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"backing file {path} is not readable and writable by the server"
    if st.st_size < size:
        return f"backing file {path} holds {st.st_size} bytes, less than the disk's {size}"
    return None
