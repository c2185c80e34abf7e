"""Faults of the backing store, for real: a full file system and a device returning EIO.

- ENOSPC: the export's file lives on a 48 MiB tmpfs mounted for the test, behind a
  256 MiB encrypted disk. Writing until the space runs out must fail with ENOSPC at the
  client (not EIO, not a dropped connection); the server stays up, an export on another
  file system keeps working, and trimming frees space so that writes succeed again.
- EIO: device-mapper is not available on this machine (no dm driver in the kernel), so
  the failing device is built from real parts instead of dm-error: nbdkit's `error`
  filter over its memory plugin, exposed as a file by nbdfuse (FUSE). The export's file
  is that FUSE file; while a trigger file exists, every read and write of nbdkit fails
  and the kernel hands our server EIO (for a read through the file's mapping: SIGBUS,
  which the XTS engine's guard turns into EIO). The client must get EIO, the server
  must stay up and serve other exports, and I/O must work again once the fault is gone.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import nbd
import pytest

from tests.helpers.servers import wait_until

MiB = 1 << 20


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")


@pytest.fixture
def small_fs(tmp_path):
    need_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], timeout=30)


def keyfile(tmp_path):
    key = tmp_path / "dek.key"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    return key


def test_enospc_reaches_the_client_and_trim_recovers(server_factory, tmp_path, small_fs):
    key = keyfile(tmp_path)
    srv = server_factory([f"full={small_fs / 'full.img'},size=256M,key={key}",
                    f"other={tmp_path / 'other.img'},size=16M,key={key}"])
    h = nbd.NBD()
    h.connect_uri(srv.uri("full"))
    block = os.urandom(MiB)
    written = 0
    with pytest.raises(nbd.Error) as failed:
        for off in range(0, 256 * MiB, MiB):
            h.pwrite(block, off)
            written = off + MiB
    assert failed.value.errnum == errno.ENOSPC, f"expected ENOSPC, got {failed.value}"
    assert 40 * MiB <= written <= 48 * MiB
    # The connection is still usable: reads of what was written, and a FUA write that
    # fits nowhere fails again with ENOSPC, not with a dropped connection.
    assert h.pread(MiB, 0) == block
    with pytest.raises(nbd.Error) as again:
        h.pwrite(block, 200 * MiB, nbd.CMD_FLAG_FUA)
    assert again.value.errnum == errno.ENOSPC
    # Another export on another file system is not affected.
    o = nbd.NBD()
    o.connect_uri(srv.uri("other"))
    o.pwrite(block, 0, nbd.CMD_FLAG_FUA)
    assert o.pread(MiB, 0) == block
    o.shutdown()
    # Trim frees space (the encrypted layer punches holes): writes succeed again.
    h.trim(16 * MiB, 0)
    h.flush()
    h.pwrite(block, 200 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(MiB, 200 * MiB) == block
    assert h.pread(MiB, 20 * MiB) == block  # untouched data intact
    assert h.pread(MiB, MiB) == bytes(MiB)  # trimmed: reads as zeros
    h.shutdown()
    srv.assert_healthy()


class FailingDevice:
    """nbdkit memory + error filter, as a file through nbdfuse; faulty while `trigger`
    exists."""

    def __init__(self, workdir, size_mib: int = 64):
        self.workdir = workdir
        self.trigger = workdir / "fail-now"
        self.sock = workdir / "nbdkit.sock"
        self.fusedir = workdir / "faulty"
        self.fusedir.mkdir()
        self.kit = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "--filter=error",
             "memory", f"{size_mib}M", "error=EIO", "error-rate=100%",
             f"error-file={self.trigger}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: self.sock.exists() or self.kit.poll() is not None, 20, what="nbdkit")
        assert self.kit.poll() is None, self.kit.communicate()[1]
        self.fuse = subprocess.Popen(["nbdfuse", str(self.fusedir), f"nbd+unix:///?socket={self.sock}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: (self.fusedir / "nbd").exists() or self.fuse.poll() is not None, 20,
                   what="nbdfuse")
        assert self.fuse.poll() is None, self.fuse.communicate()[1]
        self.path = self.fusedir / "nbd"

    def close(self):
        subprocess.run(["fusermount3", "-u", str(self.fusedir)], capture_output=True, timeout=30)
        for p in (self.fuse, self.kit):
            if p.poll() is None:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
            p.stderr.close()
        if os.path.ismount(self.fusedir):
            subprocess.run(["fusermount3", "-uz", str(self.fusedir)], capture_output=True, timeout=30)


def test_eio_from_the_backing_device(server_factory, tmp_path):
    need_root()
    for tool in ("nbdkit", "nbdfuse", "fusermount3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    dev = FailingDevice(tmp_path)
    try:
        key = keyfile(tmp_path)
        srv = server_factory([f"faulty={dev.path},key={key}", f"good={tmp_path / 'g.img'},size=16M,key={key}"])
        h = nbd.NBD()
        h.connect_uri(srv.uri("faulty"))
        data = os.urandom(256 << 10)
        h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
        dev.trigger.touch()
        # Writes go through to the device (FUSE without writeback caching); reads are at
        # offsets never read before, so no page cache can hide the fault. (FLUSH is not
        # faulted: nbdkit's error filter does not fail flushes.)
        for what, call in (("write", lambda: h.pwrite(data, 8 * MiB, nbd.CMD_FLAG_FUA)),
                           ("read", lambda: h.pread(256 << 10, 32 * MiB))):
            with pytest.raises(nbd.Error) as failed:
                call()
            assert failed.value.errnum == errno.EIO, f"{what}: expected EIO, got {failed.value}"
        # A read this large decrypts straight out of a mapping of the file (XtsLayer,
        # FileBackend.mapping): the failed read was a SIGBUS there, which the engine's
        # guard turned into EIO instead of the server dying.
        maps = open(f"/proc/{srv.pid}/maps").read()
        assert str(dev.path) in maps, "the faulty file was not read through its mapping"
        g = nbd.NBD()
        g.connect_uri(srv.uri("good"))
        g.pwrite(data, 0)
        assert g.pread(len(data), 0) == data
        g.shutdown()
        srv.assert_healthy()
        dev.trigger.unlink()
        h.pwrite(data, 16 * MiB, nbd.CMD_FLAG_FUA)
        assert h.pread(len(data), 16 * MiB) == data
        assert h.pread(len(data), 0) == data
        h.shutdown()
        srv.assert_healthy()
        srv.terminate()
    finally:
        dev.close()


def test_platform_on_a_full_filesystem(tmp_path):
    """The platform's own data directory fills up: clients get ENOSPC, a snapshot that
    cannot be written is refused (507, no half-made snapshot left), the API keeps
    answering, and once space is freed everything works again."""
    need_root()
    from tests.helpers.platform import Stack
    stack = Stack(tmp_path / "stack")
    mnt = stack.nb_dir
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        stack.start()
        stack.create_disk("big", "--size", "1G")
        h = stack.connect("big")
        block = os.urandom(MiB)
        with pytest.raises(nbd.Error) as failed:
            for off in range(0, 64 * MiB, MiB):
                h.pwrite(block, off)
        assert failed.value.errnum == errno.ENOSPC, failed.value
        status, op = stack.api("POST", "/snapshots", {"name": "s1", "disk": "big"})
        # Operations are persisted: when not even the operation's row fits, the request is
        # refused at once; otherwise the operation starts and fails. 507 either way.
        if status == 507:
            assert op["error"]["code"] == "InsufficientStorage", op
        else:
            assert status == 202, op

            def finished():
                s, body = stack.api("GET", f"/operations/{op['id']}")
                return body if body["status"] != "running" else None
            result = wait_until(finished, 60, what="the snapshot operation")
            assert result["status"] == "failed" and result["error"]["status"] == 507, result
        status, body = stack.api("GET", "/snapshots")
        assert status == 200 and body["value"] == [], body
        assert not list((mnt / "snapshots").glob("*")) if (mnt / "snapshots").exists() else True
        # Free space on the disk itself; then a snapshot fits.
        h.trim(32 * MiB, 0)
        h.flush()
        assert h.pread(MiB, 0) == bytes(MiB)
        stack.nbdserver("snapshot", "create", "s2", "--disk", "big")
        h.pwrite(block, 0, nbd.CMD_FLAG_FUA)
        assert h.pread(MiB, 0) == block
        h.shutdown()
        stack.assert_healthy()
    finally:
        stack.close()
        subprocess.run(["umount", "-l", str(mnt)], timeout=30)
