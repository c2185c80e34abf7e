"""nbdserver/host/kernel.py: the nbd driver's presence and its state in sysfs.

The sysfs readers run over a directory laid out as the kernel lays out /sys/block/nbdN
(this kernel has no nbd driver to read from); the module check runs for real."""

from __future__ import annotations

import os
import subprocess

import pytest

from nbdserver.host import kernel
from nbdserver.host.errors import MissingSupport


def _sysfs(root, devices: dict):
    for name, attrs in devices.items():
        d = root / "block" / name
        d.mkdir(parents=True)
        for k, v in attrs.items():
            (d / k).write_text(v + "\n")
    (root / "block" / "loop0").mkdir()
    (root / "module" / "nbd").mkdir(parents=True)
    return str(root)


def test_attachments_are_the_devices_with_a_pid(tmp_path):
    root = _sysfs(tmp_path, {"nbd0": {"size": "0"}, "nbd1": {"pid": "4242", "size": "2097152",
                                                             "backend": "data-1"},
                             "nbd10": {"pid": "7", "size": "8"}, "nbd2": {"size": "0"}})
    assert kernel.nbd_devices(root) == ["nbd0", "nbd1", "nbd2", "nbd10"]
    assert kernel.nbd_attachments(root) == [
        {"device": "/dev/nbd1", "via": "nbd", "state": "attached", "disk": "data-1", "pid": 4242,
         "size": 1 << 30},
        {"device": "/dev/nbd10", "via": "nbd", "state": "attached", "disk": None, "pid": 7,
         "size": 4096}]
    assert kernel.free_nbd_device(root) == "/dev/nbd0"
    kernel.require_nbd_module(root)  # /sys/module/nbd exists: loaded


def test_no_free_device(tmp_path):
    root = _sysfs(tmp_path, {"nbd0": {"pid": "1"}})
    with pytest.raises(MissingSupport, match="every /dev/nbdN is in use"):
        kernel.free_nbd_device(root)


def test_no_driver_means_no_devices(tmp_path):
    assert kernel.nbd_devices(str(tmp_path)) == []
    assert kernel.nbd_attachments(str(tmp_path)) == []


def test_missing_module_is_said_plainly():
    if os.path.isdir("/sys/module/nbd"):
        pytest.skip("this kernel has the nbd driver loaded")
    if os.geteuid() != 0:
        pytest.skip("modprobe needs root")
    if subprocess.run(["modinfo", "nbd"], capture_output=True).returncode == 0:
        pytest.skip("this kernel can load the nbd driver")
    with pytest.raises(MissingSupport) as e:
        kernel.require_nbd_module()
    assert "nbd kernel module" in e.value.message and "--via fuse" in e.value.message
