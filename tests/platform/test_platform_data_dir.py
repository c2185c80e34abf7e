"""The data directory as the platform's one root: wherever it is named from or moved to,
its volumes are found, and one missing file fails one disk, not the server.

- A relative --data-dir, then the same directory by its absolute name: the disks serve
  their data (volume paths were stored as given and, seen from elsewhere, named no file;
  the start-up removal of unnamed files then deleted every disk).
- A disk whose file is missing is `failed` with the reason in `disk show` and `disk list`,
  refused to NBD clients like any unavailable export, the reason in the log; the other
  disks serve; the file put back, it serves again.
- A data directory of the previous release (schema version 0, absolute paths) moved to
  another place: migrated at start, every disk reads back.
- A state database of a newer release is refused with a message, not a traceback.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import nbd

from tests.helpers.platform import NbdServerProcess, connect_refused, pattern
from tests.helpers.servers import ROOT, wait_until

FIXTURES = Path(__file__).parent / "fixtures"


def _write(stack, disk: str, tag: int, length: int = 1 << 20) -> bytes:
    data = pattern(tag, length)
    h = stack.connect(disk)
    h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    h.shutdown()
    return data


def _reads(stack, disk: str, data: bytes) -> None:
    h = stack.connect(disk)
    assert h.pread(len(data), 0) == data
    h.shutdown()


def _unwraps(stack) -> int:
    """UnwrapKey calls on the platform's vault so far, from its audit chain."""
    entries = stack.keyservice("audit", "show", "nbd-platform", "--limit", "1000")["value"]
    return sum(e.get("operation", "").startswith("KeyUnwrap") for e in entries)


def test_relative_data_dir_then_absolute_keeps_every_disk(make_stack):
    stack = make_stack()
    stack.stop_nbdserver()
    # The daemons run in ROOT: this names the stack's own data directory from there.
    relative = Path(os.path.relpath(stack.nb_dir, ROOT))
    assert not relative.is_absolute()
    stack.nb = NbdServerProcess(stack.workdir, relative, stack.ks, lease=stack.lease,
                                grace=stack.grace).start()
    stack.create_disk("rel1", "--size", "16M")
    data = _write(stack, "rel1", 0x4E1)
    stack.restart_nbdserver()  # by the absolute name
    assert stack.disk("rel1")["serving"]["state"] == "available"
    _reads(stack, "rel1", data)
    assert "removing" not in stack.nb.stderr_text()


def test_missing_file_fails_its_disk_only(make_stack):
    stack = make_stack()
    stack.create_disk("gone", "--size", "16M")
    stack.create_disk("kept", "--size", "16M")
    kept = _write(stack, "kept", 0x6E7)
    gone = _write(stack, "gone", 0x90E)
    shown = stack.disk("gone")
    assert shown["file"].startswith("disks/") and shown["file"].endswith(".img"), shown
    path = stack.nb_dir / shown["file"]
    stack.stop_nbdserver()
    aside = stack.workdir / "aside.img"
    os.rename(path, aside)

    stack.start_nbdserver()
    serving = stack.disk("gone")["serving"]
    assert serving["state"] == "failed" and "missing" in serving["reason"], serving
    listed = {d["name"]: d["serving"]["state"] for d in stack.nbdserver("disk", "list")}
    assert listed == {"gone": "failed", "kept": "available"}, listed
    _reads(stack, "kept", kept)
    unwraps = _unwraps(stack)
    refused = connect_refused(stack, "gone")
    assert refused is not None
    assert _unwraps(stack) == unwraps  # refused before the key service was asked
    assert "missing" not in refused and str(stack.nb_dir) not in refused  # generic refusal
    # The start-up report runs beside serving (service.py): wait for it.
    def logged():
        text = stack.nb.stderr_text()
        return text if "disk gone failed" in text else None
    log = wait_until(logged, 20, what="the failed disk in the log")
    assert "missing" in log, log[-2000:]

    os.rename(aside, path)  # the operator puts the file back: no restart needed
    assert stack.disk("gone")["serving"]["state"] == "available"
    _reads(stack, "gone", gone)


def _as_previous_release(db_path: Path, old_root: Path) -> None:
    """Rewrite a state database as the release before schema versions left it: its
    schema (the fixture), user_version 0, and volume paths absolute under `old_root`."""
    schema = sqlite3.connect(":memory:")
    schema.executescript((FIXTURES / "platform_schema_v0.sql").read_text())
    columns = {t: [c[1] for c in schema.execute(f"PRAGMA table_info({t})")]
               for (t,) in schema.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    schema.close()
    src = sqlite3.connect(db_path)  # what this release wrote, as that release's columns
    tables = {t: src.execute(f"SELECT {', '.join(cs)} FROM {t}").fetchall()
              for t, cs in columns.items()}
    src.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    old = sqlite3.connect(db_path)
    old.executescript((FIXTURES / "platform_schema_v0.sql").read_text())
    path_at = columns["volumes"].index("path")
    for t, rows in tables.items():
        for r in rows:
            if t == "volumes":
                r = (*r[:path_at], str(old_root / r[path_at]), *r[path_at + 1:])
            old.execute(f"INSERT INTO {t} ({', '.join(columns[t])}) VALUES "
                        f"({','.join('?' * len(r))})", r)
    old.commit()
    assert old.execute("PRAGMA user_version").fetchone()[0] == 0
    old.close()
    os.chmod(db_path, 0o600)


def test_previous_release_data_dir_moved_elsewhere_is_migrated(make_stack):
    stack = make_stack()
    stack.customer_key("mig", "k1", "desmig")
    stack.create_disk("cmk", "--size", "16M", "--des", "desmig")
    stack.create_disk("pmk", "--size", "16M")
    data = {"cmk": _write(stack, "cmk", 0xC3C), "pmk": _write(stack, "pmk", 0x93C)}
    stack.nbdserver("snapshot", "create", "snap", "--disk", "cmk", "--quiet")
    stack.stop_nbdserver()
    old_root = stack.nb_dir
    _as_previous_release(old_root / "platform.db", old_root)

    stack.nb_dir = stack.workdir / "moved" / "nb"
    stack.nb_dir.parent.mkdir()
    shutil.move(old_root, stack.nb_dir)
    stack.start_nbdserver()
    for disk, d in data.items():
        assert stack.disk(disk)["serving"]["state"] == "available"
        _reads(stack, disk, d)
    assert {s["name"] for s in stack.nbdserver("snapshot", "list")} == {"snap"}
    stack.create_disk("fromsnap", "--source", "snapshot:snap")
    _reads(stack, "fromsnap", data["cmk"])
    stack.stop_nbdserver()
    db = sqlite3.connect(stack.nb_dir / "platform.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    paths = [p for (p,) in db.execute("SELECT path FROM volumes")]
    db.close()
    assert paths and all(not os.path.isabs(p) for p in paths), paths


def test_newer_schema_is_refused_with_a_message(make_stack):
    stack = make_stack()
    stack.stop_nbdserver()
    db = sqlite3.connect(stack.nb_dir / "platform.db")
    db.execute("PRAGMA user_version = 999")
    db.commit()
    db.close()
    proc = NbdServerProcess(stack.workdir, stack.nb_dir, stack.ks, lease=stack.lease,
                            grace=stack.grace)
    try:
        proc.start()
        raise AssertionError("nbdserver started on a newer release's state")
    except RuntimeError:
        pass
    err = proc.stderr_text()
    assert proc.proc is not None and proc.proc.returncode == 1, err
    assert "newer release" in err and "Traceback" not in err, err
    # A database that is not one (a disk error, a wrong file put in its place): the same.
    for suffix in ("-wal", "-shm"):
        (stack.nb_dir / f"platform.db{suffix}").unlink(missing_ok=True)
    (stack.nb_dir / "platform.db").write_bytes(os.urandom(8192))
    proc = NbdServerProcess(stack.workdir, stack.nb_dir, stack.ks, lease=stack.lease,
                            grace=stack.grace)
    try:
        proc.start()
        raise AssertionError("nbdserver started on a database that is not one")
    except RuntimeError:
        pass
    err = proc.stderr_text()
    assert "not a database" in err and "Traceback" not in err, err


def test_missing_master_key_is_refused_not_replaced(make_stack):
    stack = make_stack()
    stack.customer_key("mkey", "k1", "desmk")  # a sealed identity credential in the state
    stack.stop_nbdserver()
    key = stack.nb_dir / "master.key"
    aside = stack.workdir / "master.key.aside"
    os.rename(key, aside)
    proc = NbdServerProcess(stack.workdir, stack.nb_dir, stack.ks, lease=stack.lease,
                            grace=stack.grace)
    try:
        proc.start()
        raise AssertionError("nbdserver started without the master key its state is sealed under")
    except RuntimeError:
        pass
    err = proc.stderr_text()
    assert "master key" in err and "missing" in err and "Traceback" not in err, err
    assert not key.exists()  # not silently re-keyed
    os.rename(aside, key)
    stack.start_nbdserver()
    assert stack.nbdserver("des", "show", "desmk")["name"] == "desmk"
