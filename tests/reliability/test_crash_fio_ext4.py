"""kill -9 under real workloads: fio with verification, and ext4 with fsync'd files.

- fio (its `nbd` engine) writes sequentially with crc32c verification headers and a
  FLUSH every 4 writes; the server is killed once a random amount of data reached its
  file (a condition on the file, not a timer). After a restart, fio re-reads every block
  it had completed and verifies it; then a flipped ciphertext byte must make the same
  verification fail (the oracle is live).
- ext4 through nbdfuse + a loop device: files written and fsync'd one after another, the
  server killed after K of them. After a restart the journal is replayed by a mount,
  every fsync'd file must be there with its content, and `e2fsck -fn` must find the
  file system clean.

SIGKILL keeps the kernel's page cache: see test_crash_nbd.py for what that means.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from tests.e2e.test_nbd_blockdev import BlockDevice, Mounted, _skip_unless_possible, sh
from tests.helpers.servers import BaselineServer, wait_until

BS = 64 << 10
SIZE = 32 << 20


def keyed(workdir, image, size, cache="writeback"):
    key = workdir / "dek.key"
    if not key.exists():
        key.write_bytes(os.urandom(64))
        key.chmod(0o600)
    return [f"d={image},size={size},key={key},cache={cache}"]


def fio(uri: str, *args, cwd, timeout=120) -> subprocess.CompletedProcess:
    # cwd: fio leaves its verify state file (local-*-verify.state) in the working directory.
    return subprocess.run(["fio", "--name=crash", "--ioengine=nbd", f"--uri={uri}", f"--bs={BS}",
                           "--verify=crc32c", "--output-format=json", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def fio_cycle(workdir, rng, cycle: int, cache: str = "writeback") -> int:
    image = workdir / f"fio{cycle}.img"
    spec = keyed(workdir, image, SIZE, cache)
    srv = BaselineServer(workdir, spec, name=f"fio{cycle}").start()
    writer = subprocess.Popen(["fio", "--name=crash", "--ioengine=nbd", f"--uri={srv.uri('d')}",
                               f"--bs={BS}", f"--size={SIZE}", "--rw=write", "--iodepth=1",
                               "--fsync=4", "--verify=crc32c", "--do_verify=0",
                               "--output-format=json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir)
    threshold = rng.randint(2, 24) << 20
    wait_until(lambda: image.stat().st_blocks * 512 >= threshold or writer.poll() is not None,
               60, what=f"{threshold} bytes written")
    srv.kill()
    out, err = writer.communicate(timeout=60)
    assert "Traceback" not in srv.stderr_text()
    done = json.loads(out[out.index("{"):])["jobs"][0]["write"]["io_bytes"]
    # iodepth=1 and sequential: the completed writes are exactly the first `done` bytes.
    done -= done % BS
    with BaselineServer(workdir, spec, name=f"fio{cycle}-check") as check:
        if done:
            r = fio(check.uri("d"), "--rw=read", f"--size={done}", "--do_verify=1", cwd=workdir)
            assert r.returncode == 0, f"fio verify of {done} bytes failed:\n{r.stdout[-3000:]}{r.stderr}"
        check.assert_healthy()
    if done:  # the verification can fail: corrupt one completed block's ciphertext
        with open(image, "r+b") as f:
            f.seek(rng.randrange(done // BS) * BS + 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        with BaselineServer(workdir, spec, name=f"fio{cycle}-neg") as check:
            r = fio(check.uri("d"), "--rw=read", f"--size={done}", "--do_verify=1", cwd=workdir)
            assert r.returncode != 0, "fio verification did not notice a corrupted block"
    image.unlink()
    return done


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_kill9_under_fio_verify(tmp_path, seeded_rng, cache):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    verified = [fio_cycle(tmp_path, seeded_rng, c, cache) for c in range(3)]
    print(f"\ncrash-fio: cycles=3 verified_bytes={verified}")


def ext4_cycle(workdir, rng, cycle: int) -> int:
    image = workdir / f"ext4-{cycle}.img"
    spec = keyed(workdir, image, 64 << 20)
    srv = BaselineServer(workdir, spec, name=f"ext4-{cycle}").start()
    synced: dict[str, str] = {}
    kill_after = rng.randint(5, 60)
    with BlockDevice(srv.uri("d"), workdir) as dev:
        sh("mkfs.ext4", "-q", "-F", dev.loop)
        with Mounted(dev.loop, workdir / "mnt") as mnt:
            try:
                for i in range(kill_after + 1000):
                    data = os.urandom(rng.randint(1, 200_000))
                    path = mnt / f"f{i}"
                    with open(path, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    dirfd = os.open(mnt, os.O_RDONLY)
                    os.fsync(dirfd)  # the new name is durable too
                    os.close(dirfd)
                    synced[path.name] = hashlib.sha256(data).hexdigest()
                    if len(synced) == kill_after:
                        srv.kill()
            except OSError:
                pass  # the server is gone: I/O errors from here on
            assert not srv.alive()
    assert "Traceback" not in srv.stderr_text()
    with BaselineServer(workdir, spec, name=f"ext4-{cycle}-check") as check:
        with BlockDevice(check.uri("d"), workdir) as dev:
            with Mounted(dev.loop, workdir / "mnt") as mnt:  # replays the journal
                for name, digest in synced.items():
                    got = hashlib.sha256((mnt / name).read_bytes()).hexdigest()
                    assert got == digest, f"{name}: fsync'd content lost"
            r = sh("e2fsck", "-fn", dev.loop, check=False)
            assert r.returncode == 0, f"e2fsck -fn found problems:\n{r.stdout}\n{r.stderr}"
        check.assert_healthy()
    image.unlink()
    return len(synced)


def test_kill9_under_ext4_fsync(tmp_path, seeded_rng):
    _skip_unless_possible()
    files = [ext4_cycle(tmp_path, seeded_rng, c) for c in range(2)]
    print(f"\ncrash-ext4: cycles=2 fsynced_files={files}, e2fsck -fn clean")
