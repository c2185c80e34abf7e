"""The reference workflow of the issue "Disk platform", step by step, with both daemons as
real processes and real clients (libnbd, fio's nbd engine, nbdfuse + a loop device + ext4).

An admin creates a vault with soft delete and purge protection, creates (or imports) an
RSA key, creates an encryption set with the key URL, grants its identity get/wrapKey/
unwrapKey, creates a CMK disk; a client writes; the owner disables the key (I/O fails),
enables it (the same data reads back), deletes it (fails), recovers it (works); purge is
refused under purge protection. The audit log shows the set identity's wrap and unwrap.

Both daemons' state in SQLite, then in PostgreSQL (issue 15: the same tests on both).
"""

from __future__ import annotations

import json
import os
import subprocess

import nbd
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers.images import need_tool
from tests.helpers.platform import (
    CliFailed,
    connect_refused,
    pattern,
    refusal_message,
    wait_for_eio,
    wait_for_io,
)
from tests.helpers.servers import wait_until


@pytest.fixture(scope="module", params=("sqlite", "postgresql"))
def state(request):
    return request.param


def _refused(call) -> CliFailed:
    with pytest.raises(CliFailed) as e:
        call()
    return e.value


def test_reference_workflow(stack, tmp_path):
    ks, nb = stack.keyservice, stack.nbdserver
    vault = ks("vault", "create", "cust", "--location", "local", "--subscription", "sub1",
               "--enable-purge-protection")
    assert vault["enablePurgeProtection"] is True and vault["softDeleteRetentionInDays"] > 0
    kid = ks("key", "create", "cust", "k1", "--size", "2048")["key"]["kid"]

    # The set's identity has no access yet: show says which permission is missing, and a
    # disk under the set is refused with that message.
    des = nb("des", "create", "des1", "--key-url", stack.key_url("cust", "k1"))
    oid = des["identity"]["objectId"]
    assert des["access"]["granted"] is False and "get" in des["access"]["missing"]
    assert "wrapKey" in des["access"]["missing"] and oid in des["access"]["message"]
    err = _refused(lambda: stack.create_disk("cmk1", "--size", "32M", "--des", "des1"))
    assert "wrapKey" in err.stderr and oid in err.stderr and "KeyAccessMissing" in err.stderr

    # Half a grant is still refused, naming what is left.
    stack.grant("cust", oid, "get,wrapKey")
    shown = nb("des", "show", "des1")["access"]
    assert shown["granted"] is False and shown["missing"] == ["unwrapKey"], shown
    err = _refused(lambda: stack.create_disk("cmk1", "--size", "32M", "--des", "des1"))
    assert "unwrapKey" in err.stderr

    stack.grant("cust", oid)
    assert nb("des", "show", "des1")["access"] == {"granted": True}
    disk = stack.create_disk("cmk1", "--size", "32M", "--des", "des1")
    assert disk["encryption"]["type"] == "EncryptionAtRestWithCustomerKey"
    assert disk["encryption"]["diskEncryptionSet"] == "des1"
    assert disk["encryption"]["kid"] == kid and disk["serving"]["state"] == "available"

    # A client writes (FUA) and keeps its connection through everything below.
    h = stack.connect("cmk1")
    data = pattern(7, 1 << 20)
    h.pwrite(data, 4 << 20, nbd.CMD_FLAG_FUA)
    idle = stack.connect("cmk1")
    flushed = pattern(8, 64 << 10)
    idle.pwrite(flushed, 12 << 20)  # acknowledged by a flush rather than FUA
    idle.flush()

    # Disable -> I/O fails on attached handles, new connections are refused with a message.
    ks("key", "disable", "cust", "k1")
    wait_for_eio(h)
    wait_for_eio(idle)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 0)
    assert connect_refused(stack, "cmk1")
    assert refusal_message(stack, "cmk1") == "export 'cmk1' is not available"  # no key named
    assert stack.disk("cmk1")["serving"]["state"] == "locked"
    access = nb("des", "show", "des1")["access"]  # says why: the key, not a permission
    assert access["granted"] is False and "disabled" in access["message"], access

    # Enable -> the same handles serve again, the data is intact.
    ks("key", "enable", "cust", "k1")
    wait_for_io(h)
    assert h.pread(len(data), 4 << 20) == data
    assert idle.pread(4096, 4 << 20) == data[:4096]
    assert idle.pread(len(flushed), 12 << 20) == flushed

    # Soft delete -> fails; recover -> works.
    ks("key", "delete", "cust", "k1")
    wait_for_eio(h)
    assert connect_refused(stack, "cmk1")
    ks("key", "recover", "cust", "k1")
    wait_for_io(h)
    assert h.pread(len(data), 4 << 20) == data

    # Purge is refused under purge protection (and the disk keeps serving after recovery).
    ks("key", "delete", "cust", "k1")
    wait_for_eio(h)
    err = _refused(lambda: ks("key", "purge", "cust", "k1"))
    assert "purge protection" in err.stderr
    ks("key", "recover", "cust", "k1")
    wait_for_io(h)
    assert h.pread(len(data), 4 << 20) == data
    for handle in (h, idle):
        handle.shutdown()

    # The audit log shows the set identity's wrapKey and unwrapKey calls.
    entries = ks("audit", "show", "cust")["value"]
    ops = {e["operation"] for e in entries if e.get("caller") == oid and e.get("status") == 200}
    assert any(o.startswith("KeyWrap") for o in ops), ops
    assert any(o.startswith("KeyUnwrap") for o in ops), ops
    refused = [e for e in entries if e.get("caller") == oid and e.get("status") == 403]
    assert refused, "the refusals of the disabled key are audited too"
    assert ks("audit", "verify", "cust")["valid"] is True


def test_imported_key_and_fio_verify(stack, tmp_path):
    """An imported RSA key works the same; fio's nbd engine writes and verifies through it."""
    need_tool("fio")
    pem = tmp_path / "k.pem"
    pem.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    stack.keyservice("vault", "create", "imp", "--location", "local", "--subscription", "sub1",
                     "--enable-purge-protection")
    stack.keyservice("key", "import", "imp", "k1", "--pem", pem)
    oid = stack.nbdserver("des", "create", "des-imp",
                          "--key-url", stack.key_url("imp", "k1"))["identity"]["objectId"]
    stack.grant("imp", oid)
    stack.create_disk("fio1", "--size", "32M", "--des", "des-imp")
    r = subprocess.run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={stack.nbd_uri('fio1')}",
                        "--rw=randwrite", "--bs=64k", "--size=16M", "--iodepth=16",
                        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                        "--output-format=json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 16 << 20
    assert job["read"]["io_bytes"] >= 16 << 20, job["read"]  # the verify pass read it all back


@pytest.mark.root
def test_ext4_through_nbdfuse_and_loop(stack, tmp_path):
    """ext4 on a CMK disk: mkfs, mount, write files, unmount, detach; reconnect: e2fsck clean
    and the files are there (with the key disabled in between, and enabled again)."""
    need_tool("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    cmk = stack.customer_key("extv", "k1", "des-ext")
    stack.create_disk("ext1", "--size", "64M", "--des", "des-ext")
    files = {f"f{i}.bin": os.urandom(100_000 + i) for i in range(5)}

    with _attached(stack, "ext1", tmp_path / "fuse1") as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=120)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
        try:
            for name, body in files.items():
                (mnt / name).write_bytes(body)
        finally:
            subprocess.run(["umount", str(mnt)], check=True, timeout=60)

    stack.keyservice("key", "disable", "extv", "k1")
    stack.wait_serving("ext1", "locked")
    stack.keyservice("key", "enable", "extv", "k1")
    stack.wait_serving("ext1", "available")

    with _attached(stack, "ext1", tmp_path / "fuse2") as dev:
        r = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        mnt = tmp_path / "mnt2"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "ro", dev, str(mnt)], check=True, timeout=60)
        try:
            for name, body in files.items():
                assert (mnt / name).read_bytes() == body
        finally:
            subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    assert cmk["des"] == "des-ext"


class _attached:
    """nbdfuse DIR URI (background) + losetup on DIR/nbd; teardown undoes each step taken."""

    def __init__(self, stack, disk, fuse_dir):
        self.stack, self.disk, self.dir = stack, disk, fuse_dir
        self.proc = self.loop = None

    def __enter__(self) -> str:
        self.dir.mkdir()
        self.proc = subprocess.Popen(["nbdfuse", str(self.dir), self.stack.nbd_uri(self.disk)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: (self.dir / "nbd").exists() or self.proc.poll() is not None, 20,
                       what="nbdfuse to mount")
            assert self.proc.poll() is None, self.proc.stderr.read()
            self.loop = subprocess.run(["losetup", "-f", "--show", str(self.dir / "nbd")],
                                       capture_output=True, text=True, check=True,
                                       timeout=60).stdout.strip()
        except BaseException:
            self.__exit__()
            raise
        return self.loop

    def __exit__(self, *exc) -> None:
        try:
            if self.loop:
                subprocess.run(["losetup", "-d", self.loop], timeout=60)
        finally:
            subprocess.run(["fusermount3", "-u", str(self.dir)], capture_output=True, timeout=60)
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                self.proc.stderr.close()

