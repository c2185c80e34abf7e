"""Where the platform keeps its volumes: files under the data directory (the default), or
images in a Ceph RBD pool (`nbdserver serve --storage rbd:POOL`, docs/operations.md,
"Disks on Ceph RBD").

A volume's location is what the state database keeps in its path column: a file's path
(`backing.stored_path`), or `rbd:POOL/IMAGE`. Either way the volume holds ciphertext
only: the XTS layer is put on above whichever backend opens it (`crypto.open_disk`), so
Ceph never sees a DEK or a plaintext byte.

RBD images are named `nbdserver.<owner>.<kind>.<uuid>`, `owner` being the platform's
own mark, kept in its state (every server of one platform has the same): a stray image
(a crash between a delete's commit and the image's removal) is recognised by that prefix
and removed at the next start, like a stray file, and another platform's images in the
same pool are never taken for this one's strays.

Calls that reach the cluster (open, remove, list) block: the platform runs them on worker
threads.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..backend import BlockBackend, FileSpec
from ..crypto import open_disk
from . import backing
from .errors import BadRequest

if TYPE_CHECKING:
    from ..rbdbackend import RbdSpec
    from .model import VolumeKind

log = logging.getLogger("nbdserver.platform")

FILE = "file"
IMAGE_PREFIX = "nbdserver."


@dataclass(frozen=True, slots=True)
class CephClient:
    """How this server reaches the cluster: its ceph.conf, cephx name and keyring. Kept
    per server, never in the state: another server may keep them elsewhere."""

    conf: str
    client_id: str = "admin"
    keyring: str | None = None


def parse_storage(text: str) -> str | None:
    """`file` -> None; `rbd:POOL` -> POOL. ValueError for anything else."""
    if text == FILE:
        return None
    if text.startswith(backing.RBD_SCHEME):
        pool = text[len(backing.RBD_SCHEME):]
        if pool and "/" not in pool and "@" not in pool and pool.isprintable() and len(pool) <= 128:
            return pool
    raise ValueError(f"storage is written 'file' or 'rbd:POOL', not {text!r}")


def open_volume(spec: FileSpec | RbdSpec, key: bytearray | None) -> BlockBackend:
    """`crypto.open_disk` for a file or an image alike: it needs of a spec only its
    `open()` and `encrypted`. Blocking for an image (run it on a worker)."""
    return open_disk(spec, key)  # type: ignore[arg-type]


class VolumeStorage:
    """Files under `data_dir`, or images in `default`'s pool through `ceph`."""

    def __init__(self, data_dir: str, default: str = FILE, ceph: CephClient | None = None):
        self.data_dir = data_dir
        self.ceph = ceph
        self.default_pool = parse_storage(default)
        if self.default_pool is not None and ceph is None:
            raise ValueError("--storage rbd:POOL needs --ceph-conf")

    @property
    def default(self) -> str:
        return FILE if self.default_pool is None else f"{backing.RBD_SCHEME}{self.default_pool}"

    def pool_for(self, storage: str | None) -> str | None:
        """The pool a request's `storage` names (None: the server's default; `file`: a
        file). A request for RBD on a server without a cluster is the client's error."""
        if storage is None:
            return self.default_pool
        try:
            pool = parse_storage(storage)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if pool is not None and self.ceph is None:
            raise BadRequest(f"storage {storage!r}: this server has no Ceph cluster (--ceph-conf)")
        return pool

    def new_location(self, kind: VolumeKind, pool: str | None, owner: str = "") -> str:
        name = uuid.uuid4().hex
        if pool is None:
            return os.path.join(self.data_dir, kind.value + "s", f"{name}.img")
        return f"{backing.RBD_SCHEME}{pool}/{IMAGE_PREFIX}{owner}.{kind.value}.{name}"

    @staticmethod
    def pool_of(location: str) -> str | None:
        """The pool a volume is in; None for a file."""
        if not backing.is_rbd(location):
            return None
        return location[len(backing.RBD_SCHEME):].partition("/")[0]

    def rbd_spec(self, location: str, **kw) -> RbdSpec:
        from ..rbdbackend import RbdSpec
        if self.ceph is None:
            raise OSError(2, f"volume {location} is on Ceph RBD, and this server has no "
                             "cluster (--ceph-conf)")
        return RbdSpec.parse(location, conf=self.ceph.conf, client_id=self.ceph.client_id,
                             keyring=self.ceph.keyring, **kw)

    def spec(self, location: str, *, cache: str, encrypted: bool = True,
             readonly: bool = False) -> FileSpec | RbdSpec:
        """How the volume is opened (its cache mode applies to files only: librbd's
        cache is always off, see rbdbackend.py)."""
        if backing.is_rbd(location):
            return self.rbd_spec(location, encrypted=encrypted, readonly=readonly)
        return FileSpec(location, cache=cache, encrypted=encrypted, readonly=readonly)

    def remove(self, location: str) -> None:
        """Remove a volume's data; what is not there is removed already. Blocking."""
        if backing.is_rbd(location):
            from ..rbdbackend import remove_image
            remove_image(self.rbd_spec(location))
            return
        try:
            os.unlink(location)
        except FileNotFoundError:
            pass

    def stray_images(self, known: set[str], pools: set[str], owner: str) -> list[str]:
        """Images of `owner` in `pools` that no volume names (the module's docstring)."""
        if self.ceph is None:
            return []
        from ..rbdbackend import list_images
        out = []
        for pool in sorted(pools):
            probe = self.rbd_spec(f"{backing.RBD_SCHEME}{pool}/-")
            for name in list_images(probe):
                location = f"{backing.RBD_SCHEME}{pool}/{name}"
                if name.startswith(f"{IMAGE_PREFIX}{owner}.") and location not in known:
                    out.append(location)
        return out
