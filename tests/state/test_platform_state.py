"""The platform's state (nbdserver/platform/state.py) on both engines: the same rows
come back from SQLite and PostgreSQL, migrations leave the same schema version, and
the disk leases (platform/leases.py) grant a disk to one holder at a time."""

from __future__ import annotations

import pytest

from daemonkit.statedb import StateError
from nbdserver.platform.model import EncryptionSet, KeyEnvelope, Volume, VolumeKind, VolumeState
from nbdserver.platform.state import SCHEMA_VERSION, State


@pytest.fixture(params=("sqlite", "postgresql"))
def state(request, tmp_path):
    url = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    s = State(str(tmp_path / "platform.db"), str(tmp_path), state_url=url)
    yield s
    s.close()


def _disk(name: str, wrapped: bytes = b"w" * 40) -> Volume:
    return Volume(name=name, kind=VolumeKind.DISK, size=1 << 20, subscription="s", location="l",
                  des="", envelope=KeyEnvelope("http://ks/vaults/v/keys/k/1", "RSA-OAEP-256", wrapped),
                  path="disks/" + name, state=VolumeState.READY, extra={"cache": "none"})


def test_rows_round_trip_and_upserts_replace(state, tmp_path):
    assert state.schema_version() == SCHEMA_VERSION
    des = EncryptionSet("des1", "sub", "loc", "http://ks/vaults/v/keys/k", "oid", b"\x00sealed\xff",
                        True, 1.5, auto_rotate=True)
    state.put_des(des)
    state.put_des(des)  # the same name again: replaced, not duplicated
    [got] = state.list_des()
    assert got.identity_sealed == b"\x00sealed\xff" and got.allow_cross_subscription and got.auto_rotate
    state.put_volume(_disk("d1"))
    v = state.get_volume(VolumeKind.DISK, "d1")
    assert v is not None and v.envelope.wrapped == b"w" * 40 and v.extra == {"cache": "none"}
    assert v.path == str(tmp_path / "disks" / "d1")
    # Compare and set: only from the envelope the row still holds.
    new = KeyEnvelope("http://ks/vaults/v/keys/k/2", "RSA-OAEP-256", b"n" * 40)
    assert state.replace_envelope(v, v.envelope, new, "des1")
    assert not state.replace_envelope(v, v.envelope, new, "des1")
    state.set_config("platform_key_url", "http://ks/x")
    state.set_config("platform_key_url", "http://ks/y")
    assert state.get_config("platform_key_url") == "http://ks/y"


def test_a_disk_lease_has_one_holder_until_it_expires(state):
    assert state.take_lease("d1", "A", now=100.0, ttl=10.0)
    assert state.take_lease("d1", "A", now=105.0, ttl=10.0)  # the holder again: renewed
    assert not state.take_lease("d1", "B", now=114.0, ttl=10.0)  # A's runs to 115
    assert state.lease_holder("d1", now=114.0) == "A"
    assert state.renew_leases("A", now=114.0, ttl=10.0) == {"d1"}  # now to 124
    assert not state.take_lease("d1", "B", now=123.0, ttl=10.0)
    assert state.take_lease("d1", "B", now=125.0, ttl=10.0)  # expired: taken over
    assert state.renew_leases("A", now=126.0, ttl=10.0) == set()  # A learns it lost it
    state.release_lease("d1", "A")  # not A's any more: nothing happens
    assert state.lease_holder("d1", now=126.0) == "B"
    state.release_lease("d1", "B")
    assert state.lease_holder("d1", now=126.0) is None


def test_the_disks_generation_moves_with_every_disk_row_and_only_then(state):
    """What another server's catalog follows (platform/leases.py): a disk written or
    removed moves it, also inside a transaction; a snapshot, a lease or a re-wrap
    does not (none changes what a catalog serves)."""
    assert state.disk_generation() == 0 and state.disk_rows() == {}
    disk = _disk("d1")
    state.put_volume(disk)
    first = state.disk_generation()
    assert first > 0
    [(name, (path, st, size))] = state.disk_rows().items()
    assert (name, st, size) == ("d1", VolumeState.READY, 1 << 20) and path.endswith("disks/d1")
    assert path == state.get_volume(VolumeKind.DISK, "d1").path  # resolved alike
    snap = _disk("s1")
    snap.kind = VolumeKind.SNAPSHOT
    state.put_volume(snap)
    state.take_lease("d1", "A", now=1.0, ttl=10.0)
    assert state.replace_envelope(disk, disk.envelope, KeyEnvelope("http://ks/k/2", "RSA-OAEP-256",
                                                                   b"x" * 40), "")
    assert state.disk_generation() == first
    with state.transaction():
        state.put_volume(_disk("d2"))
        state.delete_volume(VolumeKind.DISK, "d1")
    second = state.disk_generation()
    assert second > first
    assert set(state.disk_rows()) == {"d2"}
    state.delete_volume(VolumeKind.SNAPSHOT, "s1")
    assert state.disk_generation() == second


def test_a_revocation_check_gets_each_scopes_disks_by_key_version(state):
    """What platform/access.py asks on the way to a revocation's first lock: the scopes
    that wrap some disk, and per scope the disks' names by key version with one envelope
    each. Snapshots and other scopes' disks are not in them."""
    assert state.disk_scopes() == set() and state.disk_key_groups("") == {}
    v1 = KeyEnvelope("http://ks/vaults/v/keys/k/1", "RSA-OAEP-256", b"w" * 40)
    v2 = KeyEnvelope("http://ks/vaults/v/keys/k/2", "RSA-OAEP-256", b"\x00two\xff")
    for name, envelope, des in (("b", v1, "set1"), ("a", v1, "set1"), ("c", v2, "set1"), ("d", v1, "")):
        disk = _disk(name)
        disk.envelope, disk.des = envelope, des
        state.put_volume(disk)
    snap = _disk("s")
    snap.kind, snap.des = VolumeKind.SNAPSHOT, "set2"
    state.put_volume(snap)
    assert state.disk_scopes() == {"set1", ""}
    assert state.disk_key_groups("set1") == {v1.kid: (v1, ["a", "b"]), v2.kid: (v2, ["c"])}
    assert state.disk_key_groups("") == {v1.kid: (v1, ["d"])}
    assert state.disk_key_groups("set2") == {}


def test_a_volume_row_is_written_with_one_commit(tmp_path):
    """SQLite with synchronous=FULL: each commit is an fsync of the log, on the event
    loop. A disk's row, its creator's row and the disks' generation are one commit (an
    operation's row and its runner's too), or part of the caller's transaction when one
    is open."""
    state = State(str(tmp_path / "platform.db"), str(tmp_path))
    state.creator = "server-a"
    statements: list[str] = []
    state.db._db.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    disk = _disk("d1")
    disk.state = VolumeState.CREATING
    state.put_volume(disk)
    disk.state = VolumeState.READY
    state.put_volume(disk)
    state.delete_volume(VolumeKind.DISK, "d1")
    op = {"id": "op1", "kind": "disk.create", "status": "running", "started": 1.0}
    state.put_operation(op)  # with its runner's row
    state.put_operation(dict(op, status="succeeded", ended=2.0))  # the runner's row goes
    ends = [s for s in statements if s.split()[0].upper() in ("BEGIN", "COMMIT", "ROLLBACK")]
    assert ends == ["BEGIN IMMEDIATE", "COMMIT"] * 5, statements
    statements.clear()
    with state.transaction():
        state.put_volume(_disk("d2"))
        state.delete_volume(VolumeKind.DISK, "d2")
    assert [s for s in statements if s.split()[0].upper() in ("BEGIN", "COMMIT")] == \
        ["BEGIN IMMEDIATE", "COMMIT"]
    assert state.disk_generation() == 5  # each of the five writes moved it
    state.close()


def test_a_state_url_of_another_kind_is_refused(tmp_path):
    with pytest.raises(StateError, match="postgresql://"):
        State(str(tmp_path / "platform.db"), state_url="mysql://db/platform")
    assert not (tmp_path / "platform.db").exists()
