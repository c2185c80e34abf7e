"""The docs/format.md recovery recipe: the kernel's dm-crypt reads what XtsLayer wrote.

Needs root, a loop device and device-mapper with dm-crypt; skipped with the reason
otherwise (containers and minimal VMs often have no device-mapper).
"""

import os
import shutil
import subprocess

import pytest

from nbdserver.backend import FileBackend
from nbdserver.crypto import SECTOR_SIZE as S
from nbdserver.crypto import XtsLayer, generate_dek

pytestmark = pytest.mark.root


def why_not():
    if os.geteuid() != 0:
        return "needs root for losetup and cryptsetup"
    for tool in ("cryptsetup", "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    with open("/proc/misc") as f:  # not /dev/mapper/control: libdevmapper creates that node
        if "device-mapper" not in f.read():
            return "the kernel has no device-mapper (not in /proc/misc), so no dm-crypt"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control missing)"
    return None


@pytest.mark.skipif(why_not() is not None, reason=why_not() or "")
def test_cryptsetup_plain_aes_xts_plain64_reads_the_plaintext(tmp_path):
    size = 64 * S
    key = generate_dek()
    dek = bytes(key)  # the test's own copy, handed to cryptsetup on a pipe
    path = tmp_path / "disk.img"
    layer = XtsLayer(FileBackend(path, size=size), key)
    plain = os.urandom(5 * S + 512)
    layer.pwrite(plain, 3 * S + 512)  # unaligned start: exercises the RMW path too
    layer.flush()
    layer.close()

    name = f"xtstest{os.getpid()}"
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", str(path)],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(
            ["cryptsetup", "open", "--type", "plain", "--readonly",
             "--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096",
             "--iv-large-sectors", "--key-file", "-", "--keyfile-size", "64", loop, name],
            input=dek, check=True, capture_output=True)
        try:
            with open(f"/dev/mapper/{name}", "rb") as dev:
                dev.seek(3 * S + 512)
                assert dev.read(len(plain)) == plain
        finally:
            subprocess.run(["cryptsetup", "close", name], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True, capture_output=True)
