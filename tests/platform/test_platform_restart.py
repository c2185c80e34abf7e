"""What survives a restart of nbdserver, and what never reaches its storage or logs.

- Restart: disks (CMK and PMK), their wrapped DEKs, snapshots and images survive; the data
  reads back; a disk made from the snapshot after the restart has the snapshot's data.
- Secrets at rest: after a workload, restarts and a revocation, neither the nbdserver data
  directory (state, disk files, everything) nor either daemon's log holds any disk's DEK
  (raw, hex or base64), and no disk file holds the plaintext written to it. Key files
  are 0600.
"""

from __future__ import annotations

import base64
import json
import os
import stat

import nbd

from tests.helpers.platform import pattern, scan_for, wait_for_eio, wait_for_io


def _encodings(name: str, secret: bytes) -> dict[str, bytes]:
    out = {}
    for part, value in (("", secret), (".k1", secret[:32]), (".k2", secret[32:])):
        out[f"{name}{part}"] = value
        out[f"{name}{part}.hex"] = value.hex().encode()
        out[f"{name}{part}.b64"] = base64.b64encode(value).rstrip(b"=")
        out[f"{name}{part}.b64url"] = base64.urlsafe_b64encode(value).rstrip(b"=")
    return out


def test_restart_keeps_disks_keys_and_snapshots_and_no_secret_leaks(make_stack):
    stack = make_stack()
    stack.customer_key("cust", "k1", "des1")
    stack.create_disk("cmk1", "--size", "32M", "--des", "des1")
    stack.create_disk("pmk1", "--size", "16M")
    plain = {d: pattern(0x5EC0 + i, 4 << 20) for i, d in enumerate(("cmk1", "pmk1"))}
    for d, data in plain.items():
        h = stack.connect(d)
        h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
        h.shutdown()
    stack.nbdserver("snapshot", "create", "snap1", "--disk", "cmk1", "--quiet")
    stack.nbdserver("image", "create", "img1", "--source", "disk:pmk1", "--quiet")
    h = stack.connect("cmk1")
    h.pwrite(pattern(0xAF7E, 1 << 20), 1 << 20, nbd.CMD_FLAG_FUA)  # after the snapshot
    h.shutdown()
    before = {d: stack.nbdserver("disk", "key-envelope", d) for d in plain}
    deks = {d: stack.dek(d) for d in plain}

    stack.restart_nbdserver()
    assert {d["name"] for d in stack.nbdserver("disk", "list")} == {"cmk1", "pmk1"}
    assert {s["name"] for s in stack.nbdserver("snapshot", "list")} == {"snap1"}
    assert {i["name"] for i in stack.nbdserver("image", "list")} == {"img1"}
    for d in plain:
        assert stack.nbdserver("disk", "key-envelope", d) == before[d]
        stack.wait_serving(d)
    h = stack.connect("cmk1")
    assert h.pread(1 << 20, 1 << 20) == pattern(0xAF7E, 1 << 20)
    assert h.pread(3 << 20, 2 << 20) == plain["cmk1"][1 << 20:]
    hp = stack.connect("pmk1")
    assert hp.pread(4 << 20, 1 << 20) == plain["pmk1"]
    hp.shutdown()
    # Opening at start unwrapped the PMK DEK as the platform identity (audited).
    admin = json.loads(stack.ks.admin_credential.read_text())["object_id"]
    entries = stack.keyservice("audit", "show", "nbd-platform")["value"]
    assert any(e.get("operation", "").startswith("KeyUnwrap") and e.get("caller") == admin
               and e.get("status") == 200 for e in entries), entries[-5:]
    stack.create_disk("fromsnap", "--source", "snapshot:snap1")
    stack.create_disk("fromimg", "--source", "image:img1")
    deks["fromsnap"], deks["fromimg"] = stack.dek("fromsnap"), stack.dek("fromimg")
    for d, src in (("fromsnap", "cmk1"), ("fromimg", "pmk1")):
        hh = stack.connect(d)
        assert hh.pread(4 << 20, 1 << 20) == plain[src]
        hh.shutdown()

    # A revocation and a recovery (the paths that wipe and unwrap DEKs again), then stop.
    stack.keyservice("key", "disable", "cust", "k1")
    wait_for_eio(h)
    stack.keyservice("key", "enable", "cust", "k1")
    wait_for_io(h)
    h.shutdown()
    stack.stop_nbdserver()

    needles = {}
    for d, dek in deks.items():
        needles.update(_encodings(f"dek:{d}", dek))
    for d, data in plain.items():
        needles[f"plaintext:{d}"] = data[:4096]
    hits = scan_for(needles, [stack.nb_dir, stack.ks_dir], extra_texts=[stack.logs()])
    assert not hits, hits
    # Nor do the platform identity's secret or the API token reach the nbdserver's files
    # (other than the token's own file) or either log.
    secret = json.loads(stack.ks.admin_credential.read_text())["client_secret"].encode()
    token = stack.nb.token_file.read_bytes().strip()
    hits = scan_for({"admin client_secret": secret}, [stack.nb_dir], extra_texts=[stack.logs()])
    hits += scan_for({"api token": token}, [], extra_texts=[stack.logs()])
    assert not hits, hits

    for name in ("master.key", "api.token"):
        mode = stat.S_IMODE(os.stat(stack.nb_dir / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    for sub in ("", "disks", "snapshots", "images"):
        assert stat.S_IMODE(os.stat(stack.nb_dir / sub).st_mode) & 0o077 == 0, sub

    # Restarted while the key is disabled: the disk opens locked, saying why; enabling the
    # key opens it (the change stream, no restart).
    stack.keyservice("key", "disable", "cust", "k1")
    stack.start_nbdserver()
    shown = stack.disk("cmk1")["serving"]
    assert shown["state"] == "locked" and "disabled" in shown["reason"], shown
    assert stack.disk("pmk1")["serving"]["state"] == "available"
    stack.keyservice("key", "enable", "cust", "k1")
    stack.wait_serving("cmk1")
    h = stack.connect("cmk1")
    assert h.pread(1 << 20, 1 << 20) == pattern(0xAF7E, 1 << 20)
    h.shutdown()
