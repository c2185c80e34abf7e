"""Backups of both daemons taken online, restored into other data directories.

- `nbdserver backup --include-data` and `keyservice backup` while both serve; a write
  after the backup is not in it (one moment); the backups are 0700 directories of 0600
  files holding no DEK and no master key (not asked for); both daemons started on the
  restored directories (the originals moved away, the master keys supplied from where
  the operator keeps them) serve every disk, snapshot and key as they were.
- Refusals: a directory that is not empty, a data directory without state, each a
  message and exit status 1; `--include-master-key` copies the key 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import nbd

from tests.helpers.platform import pattern, scan_for


def _private_tree(root: Path) -> None:
    assert stat.S_IMODE(root.stat().st_mode) == 0o700, root
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            assert stat.S_IMODE(os.stat(Path(dirpath) / d).st_mode) == 0o700, d
        for f in files:
            mode = stat.S_IMODE(os.stat(Path(dirpath) / f).st_mode)
            assert mode == 0o600, (f, oct(mode))


def _write(stack, disk: str, data: bytes, offset: int = 0) -> None:
    h = stack.connect(disk)
    h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
    h.shutdown()


def _read(stack, disk: str, length: int, offset: int = 0) -> bytes:
    h = stack.connect(disk)
    try:
        return h.pread(length, offset)
    finally:
        h.shutdown()


def test_online_backups_restore_into_other_data_dirs(make_stack):
    stack = make_stack()
    stack.customer_key("bkvault", "k1", "desbk")
    stack.create_disk("cmk", "--size", "16M", "--des", "desbk")
    stack.create_disk("pmk", "--size", "16M")
    before = {"cmk": pattern(0xB0C, 1 << 20), "pmk": pattern(0xB0F, 1 << 20)}
    for disk, data in before.items():
        _write(stack, disk, data)
    stack.nbdserver("snapshot", "create", "snap", "--disk", "cmk", "--quiet")
    deks = {d: stack.dek(d) for d in before}

    nb_backup, ks_backup = stack.workdir / "backup" / "nb", stack.workdir / "backup" / "ks"
    manifest = stack.nbdserver("backup", nb_backup, "--data-dir", stack.nb_dir, "--include-data")
    ks_manifest = stack.keyservice("backup", ks_backup, "--data-dir", stack.ks_dir)
    _write(stack, "pmk", pattern(0xAF7, 1 << 20))  # after the backup: not in it

    assert manifest["schemaVersion"] >= 1 and "not included" in manifest["masterKey"]
    assert {(v["kind"], v["name"], v["data"]) for v in manifest["volumes"]} == {
        ("disk", "cmk", "copied"), ("disk", "pmk", "copied"), ("snapshot", "snap", "copied")}
    assert "platform.db" in manifest["files"] and "master.key" not in manifest["files"]
    assert ks_manifest["service"] == "keyservice" and "master-key" not in ks_manifest["files"]
    for root in (nb_backup, ks_backup):
        _private_tree(root)
    needles = {f"dek:{d}": dek for d, dek in deks.items()}
    needles.update({f"dek:{d}.hex": dek.hex().encode() for d, dek in deks.items()})
    needles["nb master key"] = (stack.nb_dir / "master.key").read_bytes()
    needles["ks master key"] = (stack.ks_dir / "master-key").read_bytes()
    assert not scan_for(needles, [nb_backup, ks_backup])

    # Another place: the originals moved away, the backups copied in as data directories,
    # the master keys and the admin credential from where the operator keeps them.
    stack.stop_nbdserver()
    stack.stop_keyservice()
    kept = stack.workdir / "operator"
    shutil.move(stack.nb_dir, kept / "nb")
    shutil.move(stack.ks_dir, kept / "ks")
    stack.nb_dir, stack.ks_dir = stack.workdir / "restored" / "nb", stack.workdir / "restored" / "ks"
    shutil.copytree(nb_backup, stack.nb_dir)
    shutil.copytree(ks_backup, stack.ks_dir)
    for src, dst in ((kept / "nb" / "master.key", stack.nb_dir / "master.key"),
                     (kept / "ks" / "master-key", stack.ks_dir / "master-key"),
                     (kept / "ks" / "admin.credential", stack.ks_dir / "admin.credential")):
        shutil.copy2(src, dst)
    stack.start_keyservice()
    stack.start_nbdserver()

    assert {d["name"] for d in stack.nbdserver("disk", "list")} == {"cmk", "pmk"}
    for disk, data in before.items():
        assert stack.disk(disk)["serving"]["state"] == "available"
        assert _read(stack, disk, len(data)) == data  # pmk: as at the backup, not after
    stack.create_disk("fromsnap", "--source", "snapshot:snap")
    assert _read(stack, "fromsnap", 1 << 20) == before["cmk"]
    assert stack.keyservice("audit", "verify", "bkvault")["valid"] is True
    # Revocation still works on the restored pair: the change stream is the restored one.
    stack.keyservice("key", "disable", "bkvault", "k1")
    stack.wait_serving("cmk", "locked")


def test_backup_refusals_and_the_master_key_on_request(make_stack, tmp_path):
    stack = make_stack()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old").write_text("x")
    for argv in (("backup", busy, "--data-dir", stack.nb_dir),
                 ("backup", tmp_path / "new1", "--data-dir", tmp_path / "nothing-here")):
        r = stack.nbdserver(*argv, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "not empty" in stack.nbdserver("backup", busy, "--data-dir", stack.nb_dir,
                                          check=False).stderr
    r = stack.keyservice("backup", busy, "--data-dir", stack.ks_dir, check=False)
    assert r.returncode == 1 and "not empty" in r.stderr and "Traceback" not in r.stderr
    theirs = tmp_path / "theirs"  # empty, but another user could swap what is written
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    r = stack.nbdserver("backup", theirs, "--data-dir", stack.nb_dir, check=False)
    assert r.returncode == 1 and "another user" in r.stderr, r.stderr
    link = tmp_path / "link"  # a symlink to a directory is not the directory asked for
    link.symlink_to(tmp_path / "new-target", target_is_directory=True)
    (tmp_path / "new-target").mkdir()
    r = stack.nbdserver("backup", link, "--data-dir", stack.nb_dir, check=False)
    assert r.returncode == 1 and "not a directory" in r.stderr, r.stderr

    out = tmp_path / "withkey"
    manifest = stack.nbdserver("backup", out, "--data-dir", stack.nb_dir, "--include-master-key")
    assert manifest["files"]["master.key"]["bytes"] == 32
    assert (out / "master.key").read_bytes() == (stack.nb_dir / "master.key").read_bytes()
    assert manifest["volumeData"] == "not included"
    _private_tree(out)
    ks_out = tmp_path / "kswithkey"
    stack.keyservice("backup", ks_out, "--data-dir", stack.ks_dir, "--include-master-key")
    assert (ks_out / "master-key").read_bytes() == (stack.ks_dir / "master-key").read_bytes()
    _private_tree(ks_out)
    assert json.loads((ks_out / "manifest.json").read_text())["files"]["keyservice.db"]["bytes"] > 0
