"""Records of fuse attachments: RUN_DIR/attachments/loopN.json, one per loop device.

The kernel knows the loop device and its backing file, and nothing about the nbdfuse
process or the disk behind that file; the record keeps those. It lives under /run
(a tmpfs): after a reboot no attachment survives, and neither does its record.
RUN_DIR is $NBDSERVER_RUN_DIR, default /run/nbdserver.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

DEFAULT_RUN_DIR = "/run/nbdserver"


def run_dir() -> str:
    return os.environ.get("NBDSERVER_RUN_DIR") or DEFAULT_RUN_DIR


@dataclass
class FuseRecord:
    device: str          # /dev/loopN
    disk: str            # the export name
    nbd: str             # HOST:PORT of the NBD server
    mountpoint: str      # the nbdfuse mount directory
    file: str            # mountpoint/nbd, the loop device's backing file
    nbdfuse_pid: int
    connections: int
    created: float

    @property
    def via(self) -> str:
        return "fuse"


class RecordStore:
    def __init__(self, root: str | None = None):
        self.root = root or run_dir()
        self.dir = os.path.join(self.root, "attachments")

    def _path(self, device: str) -> str:
        return os.path.join(self.dir, os.path.basename(device) + ".json")

    def put(self, rec: FuseRecord) -> None:
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        path = self._path(rec.device)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(rec), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)  # a reader never sees half a record

    def get(self, device: str) -> FuseRecord | None:
        try:
            with open(self._path(device)) as f:
                return FuseRecord(**json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return None  # a record we cannot read is as good as none; `attachments` lists loops

    def remove(self, device: str) -> None:
        try:
            os.unlink(self._path(device))
        except FileNotFoundError:
            pass

    def all(self) -> list[FuseRecord]:
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        return [r for r in (self.get("/dev/" + n[:-5]) for n in names) if r is not None]
