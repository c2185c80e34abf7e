"""`nbdserver attach | detach | attachments` against the real daemons.

The fuse path end to end (mkfs.ext4, mount, write, umount, detach, attach again, e2fsck
clean, files intact), its refusals and its broken state; the nbd path's refusals and, with
--dry-run, the exact nbd-client command line built from a real handshake (the kernel here
has no nbd driver, so nbd-client itself cannot run)."""

from __future__ import annotations

import hashlib
import json
import os
import signal

import pytest

from tests.helpers.servers import wait_until
from tests.host.hostutil import require_fuse_path, sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def disk(stack):
    stack.create_disk("d1", "--size", "64M", "--des", "des1")
    return "d1"


def attach(stack, *args):
    return stack.nbdserver("attach", *args)


def refused(stack, *args) -> str:
    r = stack.nbdserver(*args, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
    return r.stderr


def write_files(root) -> dict[str, str]:
    sums = {}
    for i, size in enumerate([0, 4096, 65537, 2 << 20]):
        data = os.urandom(size)
        (root / f"f{i}").write_bytes(data)
        sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return sums


def check_files(root, sums) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def test_fuse_attach_ext4_detach_attach_again(stack, disk, tmp_path):
    require_fuse_path()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    a = attach(stack, disk, "--via", "fuse")
    dev = a["device"]
    try:
        assert dev.startswith("/dev/loop") and a["state"] == "attached" and a["disk"] == disk
        assert a["nbd"] == stack.nb.nbd_address  # from GET /info
        listed = stack.nbdserver("attachments")
        assert [(x["device"], x["via"], x["disk"], x["state"]) for x in listed] == \
            [(dev, "fuse", disk, "attached")]
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
        sh("mount", "-t", "ext4", dev, mnt)
        try:
            sums = write_files(mnt)
            # Busy: detach refuses instead of leaving a half-torn device under a mount.
            assert "mounted at" in refused(stack, "detach", dev)
        finally:
            sh("umount", mnt)
        assert stack.nbdserver("detach", dev)["state"] == "detached"
        dev = None
        assert stack.nbdserver("attachments") == []

        dev = attach(stack, disk, "--via", "fuse", "--nbd", stack.nb.nbd_address)["device"]
        sh("e2fsck", "-fn", dev)
        sh("mount", "-t", "ext4", dev, mnt)
        try:
            check_files(mnt, sums)
        finally:
            sh("umount", mnt)
        assert stack.nbdserver("detach", disk)["device"] == dev  # by the disk's name
        dev = None
    finally:
        if dev:
            stack.nbdserver("detach", dev, check=False)
    assert stack.nbdserver("attachments") == []
    assert not [m for m in open("/proc/mounts") if "nbdfuse" in m and str(stack.workdir) in m]


def test_nbdfuse_gone_is_broken_and_detach_cleans_up(stack, disk, run_dir):
    require_fuse_path()
    a = attach(stack, disk, "--via", "fuse")
    try:
        os.kill(a["nbdfuse_pid"], signal.SIGKILL)
        wait_until(lambda: stack.nbdserver("attachments")[0]["state"] == "broken", 10,
                   what="the attachment to show broken")
        # I/O on the device fails now rather than hanging. (Pages the kernel cached before
        # nbdfuse died could still be served: they are dropped first, and the block read
        # is one nothing read before.)
        sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        r = sh("dd", f"if={a['device']}", "of=/dev/null", "bs=4096", "count=1", "skip=12345",
               "iflag=direct", check=False)
        assert r.returncode != 0
    finally:
        stack.nbdserver("detach", a["device"])
    assert stack.nbdserver("attachments") == []
    # The dead nbdfuse's mount is gone too (a stat of it fails with ENOTCONN, so only the
    # mount table tells).
    assert os.listdir(run_dir / "fuse") == []
    assert not [m for m in open("/proc/mounts") if str(run_dir) in m]


def test_two_connections_with_multi_conn(stack, disk):
    require_fuse_path()
    a = attach(stack, disk, "--via", "fuse", "--connections", "2")
    try:
        assert a["connections"] == 2
        wait_until(lambda: stack.disk(disk)["serving"]["connections"] >= 2, 10,
                   what="two NBD connections")
    finally:
        stack.nbdserver("detach", a["device"])


def test_fuse_refusals(stack, disk):
    assert "cannot open disk 'nope'" in refused(stack, "attach", "nope", "--via", "fuse")
    assert "invalid disk name" in refused(stack, "attach", "../x", "--via", "fuse")
    assert "--device names a /dev/nbdN" in refused(stack, "attach", disk, "--via", "fuse",
                                                   "--device", "/dev/nbd0")
    assert "between 1 and 16" in refused(stack, "attach", disk, "--via", "fuse",
                                         "--connections", "99")
    assert "invalid NBD address" in refused(stack, "attach", disk, "--via", "fuse", "--nbd", "x:99999")
    assert "not attached" in refused(stack, "detach", disk)
    assert "not a fuse attachment" in refused(stack, "detach", "/dev/loop7")


def test_nbd_path_refuses_plainly_without_the_kernel_module(stack, disk):
    if os.path.isdir("/sys/module/nbd"):
        pytest.skip("this kernel has the nbd driver")
    msg = refused(stack, "attach", disk)
    assert "nbd kernel module is not loaded and cannot be loaded" in msg and "--via fuse" in msg
    assert "not attached" in refused(stack, "detach", "/dev/nbd0")
    assert "not an NBD device" in refused(stack, "attach", disk, "--dry-run", "--device", "/dev/sda")


def test_nbd_dry_run_builds_the_command_line_from_a_real_handshake(stack, disk):
    host, port = stack.nb.nbd_address.rsplit(":", 1)
    out = attach(stack, disk, "--dry-run", "--device", "/dev/nbd5", "--connections", "4")
    # The server offers multi-conn (NBD_FLAG_CAN_MULTI_CONN), so -C 4 is allowed.
    assert out["argv"] == ["nbd-client", "-N", disk, host, port, "/dev/nbd5", "-b", "4096",
                           "-C", "4", "-p"]
    if not os.path.isdir("/sys/module/nbd"):
        assert out["ready"] is False and "nbd kernel module" in out["problem"]
    assert "cannot open disk 'nope'" in refused(stack, "attach", "nope", "--dry-run")
    assert "--dry-run shows the nbd-client command line" in refused(
        stack, "attach", disk, "--via", "fuse", "--dry-run")


def test_attachments_is_json(stack):
    r = stack.nbdserver("attachments", check=False)
    assert r.returncode == 0 and json.loads(r.stdout) == []
