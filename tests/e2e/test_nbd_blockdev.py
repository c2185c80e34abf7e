"""The export as a real block device: nbdfuse exposes it as a file, a loop device makes it a
disk, and ext4 lives on it (mkfs, mount, files, umount, e2fsck, remount)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from tests.helpers.servers import wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
TIMEOUT = 60


def sh(*argv, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _skip_unless_possible():
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")
    for tool in ("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is not available")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices are not available (/dev/loop-control missing)")


class BlockDevice:
    """nbdfuse + losetup, undone in reverse order whatever happened."""

    def __init__(self, uri: str, workdir):
        self.uri = uri
        self.fusedir = workdir / "fuse"
        self.fusedir.mkdir(exist_ok=True)
        self.fuse: subprocess.Popen | None = None
        self.loop = ""

    def __enter__(self):
        try:
            # --readonly is not given: the device must be writable. nbdfuse stays in the
            # foreground until unmounted, so it runs in the background here.
            self.fuse = subprocess.Popen(["nbdfuse", str(self.fusedir), self.uri],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            nbdfile = self.fusedir / "nbd"

            def ready():
                if self.fuse.poll() is not None:
                    raise AssertionError(f"nbdfuse exited: {self.fuse.stderr.read().decode()}")
                return nbdfile.exists() and os.path.ismount(self.fusedir)
            wait_until(ready, TIMEOUT, what="nbdfuse to expose DIR/nbd")
            p = sh("losetup", "-f", "--show", str(nbdfile), check=False)
            if p.returncode != 0:
                pytest.skip(f"losetup cannot attach a loop device here: {p.stderr.strip()}")
            self.loop = p.stdout.strip()
            return self
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        if self.loop:
            sh("losetup", "-d", self.loop, check=False)
            self.loop = ""
        if self.fuse is not None:
            if os.path.ismount(self.fusedir):
                sh("fusermount3", "-u", str(self.fusedir), check=False)
            try:
                self.fuse.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait(timeout=10)
            if os.path.ismount(self.fusedir):  # nbdfuse died without unmounting
                sh("fusermount3", "-uz", str(self.fusedir), check=False)
            self.fuse.stderr.close()
            self.fuse = None


class Mounted:
    def __init__(self, device: str, mountpoint):
        self.device, self.mountpoint = device, mountpoint
        mountpoint.mkdir(exist_ok=True)

    def __enter__(self):
        sh("mount", "-t", "ext4", self.device, str(self.mountpoint))
        return self.mountpoint

    def __exit__(self, *exc):
        if os.path.ismount(self.mountpoint):
            p = sh("umount", str(self.mountpoint), check=False)
            if p.returncode != 0:
                sh("umount", "-l", str(self.mountpoint), check=False)


def write_files(root) -> dict[str, str]:
    sums = {}
    (root / "dir").mkdir()
    for i, size in enumerate([0, 1, 511, 4096, 65537, 3 << 20]):
        data = os.urandom(size)
        name = f"dir/f{i}"
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    os.sync()
    return sums


def check_files(root, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def test_ext4_on_the_export_through_nbdfuse_and_a_loop_device(server, tmp_path):
    _skip_unless_possible()
    uri = server.uri("disk")
    mnt = tmp_path / "mnt"
    with BlockDevice(uri, tmp_path) as dev:
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev.loop)
        with Mounted(dev.loop, mnt) as root:
            sums = write_files(root)
            check_files(root, sums)
        sh("e2fsck", "-fn", dev.loop)
    server.assert_healthy()
    # A fresh device over a fresh connection: the filesystem is clean, the files intact.
    with BlockDevice(uri, tmp_path) as dev:
        sh("e2fsck", "-fn", dev.loop)
        with Mounted(dev.loop, mnt) as root:
            check_files(root, sums)
            os.remove(root / "dir" / "f5")  # ext4 frees blocks; fstrim sends TRIM
            sh("fstrim", str(root), check=False)
    server.assert_healthy()
