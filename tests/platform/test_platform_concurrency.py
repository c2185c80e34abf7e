"""Many API clients at once on a few names (issue 24): no deadlock, no stuck operation,
nothing half-made, and revocation still on time afterwards.

Client threads run random lifecycle operations over HTTP against the real `nbdserver
serve` on a small pool of disk and snapshot names, so that they collide: create
(platform key or des1), move both ways, force delete while attached, snapshot while a
client writes, disk from a snapshot, delete a snapshot; the encryption sets are a
customer-key one and a double-encryption one (two DEKs per disk, issue 18), so moves
cross between one layer and two. Meanwhile a customer-key disk
outside the storm is written to without pause. Afterwards:

- no answer was a 5xx (neither a request's nor an operation's), and every refusal was a
  4xx with a message;
- nothing is still running (`GET /operations`), within a deadline;
- the state, the NBD catalog and the files agree: every listed disk serves, every name
  not listed is not an export, each listed volume has exactly one file;
- every snapshot seeds a disk;
- the busy customer-key disk stops serving within a second of its key's disable.

The suite runs a short storm; `--slow` a long one, which prints its figures.
"""

from __future__ import annotations

import collections
import random
import threading
import time

import pytest

from tests.helpers.platform import Writer, is_eio
from tests.helpers.servers import wait_until
from tests.platform.test_platform_double import DOUBLE, double_set

DISKS = [f"d{i}" for i in range(6)]
SNAPS = [f"s{i}" for i in range(4)]
SETS = ("des1", "des2")  # customer key; platform and customer keys (double encryption)
SIZE = 1 << 20
LOCK_DEADLINE = 1.0  # the platform's promise: I/O stops within a second of a revocation


class Storm:
    def __init__(self, stack, seconds: float, clients: int):
        self.stack, self.seconds, self.clients = stack, seconds, clients
        self.codes: collections.Counter = collections.Counter()
        self.succeeded: collections.Counter = collections.Counter()  # (what, set of a create)
        self.failures: list = []  # 5xx and anything else unexpected
        self.done = 0
        self.lock = threading.Lock()
        self.attached: list = []

    def record(self, what, status, body):
        with self.lock:
            self.done += 1
            self.codes[status] += 1
            if status < 300:
                self.succeeded[what[0], what[2] if what[0] == "create" else None] += 1
            if status >= 500 or (status >= 400 and not (isinstance(body, dict) and body.get(
                    "error", {}).get("message"))):
                self.failures.append((what, status, body))

    def follow(self, what, status, body):
        """A 202's operation, to its end: its outcome is recorded like an answer."""
        if status != 202:
            return self.record(what, status, body)
        op_id = body["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            s, op = self.stack.api("GET", f"/operations/{op_id}")
            if op["status"] != "running":
                err = op.get("error")
                return self.record(what, err["status"] if err else 200,
                                   {"error": err} if err else op)
            time.sleep(0.02)  # polling an operation's status, not synchronisation
        self.failures.append((what, "still running after 120 s", op_id))

    def one(self, rnd: random.Random) -> None:
        api = self.stack.api
        d, d2, s = rnd.choice(DISKS), rnd.choice(DISKS), rnd.choice(SNAPS)
        k = rnd.randrange(8)
        if k == 0:
            body = {"name": d, "size": SIZE}
            des = rnd.choice(SETS + (None,))
            if des is not None:
                body["diskEncryptionSet"] = des
            self.follow(("create", d, des), *api("POST", "/disks", body))
        elif k == 1:
            self.follow(("snapshot", s, d), *api("POST", "/snapshots", {"name": s, "disk": d}))
        elif k == 2:
            self.follow(("from-snapshot", d, s), *api("POST", "/disks", {
                "name": d, "source": f"snapshot:{s}"}))
        elif k in (3, 4):
            body = {"diskEncryptionSet": rnd.choice(SETS)} if k == 3 else {"platformKey": True}
            self.record(("move", d, k), *api("PATCH", f"/disks/{d}", body))
        elif k == 5:
            self.record(("delete", d), *api("DELETE", f"/disks/{d}?force=true"))
        elif k == 6:
            self.record(("delete-snapshot", s), *api("DELETE", f"/snapshots/{s}"))
        else:
            self.write_a_little(d2)

    def write_a_little(self, disk: str) -> None:
        """Attach and write (a snapshot or a delete may happen meanwhile): any NBD error
        is fine here, the disk may be gone or locked; a hang is not."""
        import nbd
        try:
            h = self.stack.connect(disk)
        except nbd.Error:
            return
        try:
            for i in range(8):
                h.pwrite(bytes([i]) * 65536, i * 65536)
            h.flush()
        except nbd.Error:
            pass
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    def run(self) -> float:
        end = time.monotonic() + self.seconds

        def client(seed):
            rnd = random.Random(seed)
            while time.monotonic() < end:
                try:
                    self.one(rnd)
                except Exception as e:  # a client error is a finding, not a crash of the test
                    with self.lock:
                        self.failures.append(("client", repr(e)))
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 180)
            assert not t.is_alive(), "a client thread is stuck"
        return time.monotonic() - t0


def _files(stack, kind: str) -> int:
    return len(list((stack.nb.data_dir / f"{kind}s").glob("*.img")))


def storm_and_check(make_stack, seconds: float, clients: int) -> dict:
    stack = make_stack()
    stack.customer_key("cust", "k1", "des1")
    double_set(stack, "cust2", "des2")
    stack.customer_key("live", "kl", "des-live")
    stack.create_disk("live", "--size", "16M", "--des", "des-live")
    writer = Writer(stack, "live", span=4 << 20)
    writer.start()

    storm = Storm(stack, seconds, clients)
    duration = storm.run()
    assert not storm.failures, storm.failures[:10]
    # The storm did cross one layer and two: disks were made in each set.
    assert all(storm.succeeded["create", des] for des in SETS + (None,)), storm.succeeded

    def idle():
        s, ops = stack.api("GET", "/operations")
        return s == 200 and not ops["inProgress"] and all(
            o["status"] != "running" for o in ops["value"])
    wait_until(idle, 60, interval=0.05, what="no operation still running")

    disks = {d["name"]: d for d in stack.api("GET", "/disks")[1]["value"]}
    snaps = {s["name"]: s for s in stack.api("GET", "/snapshots")[1]["value"]}
    assert _files(stack, "disk") == len(disks), (disks.keys(), _files(stack, "disk"))
    assert _files(stack, "snapshot") == len(snaps), (snaps.keys(), _files(stack, "snapshot"))
    assert all(v["state"] == "ready" for v in list(disks.values()) + list(snaps.values()))
    for name, disk in disks.items():  # a disk in the double set has both layers' keys
        status, envelope = stack.api("GET", f"/disks/{name}/key-envelope")
        assert status == 200, (name, envelope)
        double = "two stacked" in envelope.get("format", "")
        encryption = disk["encryption"]
        in_double_set = encryption.get("diskEncryptionSet") == "des2"
        assert double == in_double_set, (name, encryption, envelope.get("format"))
        assert (encryption["type"] == DOUBLE) == double
    import nbd
    for name in DISKS:
        if name in disks:
            assert disks[name]["serving"]["state"] == "available", disks[name]
            h = stack.connect(name)
            assert h.get_size() >= SIZE
            h.pread(4096, 0)
            h.shutdown()
        else:
            with pytest.raises(nbd.Error):
                stack.connect(name)
    for s in snaps:
        stack.create_disk(f"seed-{s}", "--source", f"snapshot:{s}")
        h = stack.connect(f"seed-{s}")
        h.pread(4096, 0)
        h.shutdown()

    # Revocation after the storm: the busy customer-key disk stops within the deadline.
    before = writer.error
    assert before is None, before
    asked = time.monotonic()
    stack.keyservice("key", "disable", "live", "kl")
    wait_until(lambda: writer.error is not None, LOCK_DEADLINE, interval=0.005,
               what="the busy disk to fail after its key's disable")
    assert writer.error is not None and is_eio(writer.error), writer.error
    assert writer.first_error_at is not None  # set with writer.error
    lock_time = writer.first_error_at - asked  # an upper bound: from before the CLI ran
    writer.close()
    return {"operations": storm.done, "by_status": dict(sorted(storm.codes.items())),
            "duration": round(duration, 1), "clients": clients, "disks_left": len(disks),
            "snapshots_left": len(snaps), "lock_after_disable": round(lock_time, 3)}


def test_many_clients_on_colliding_names(make_stack):
    figures = storm_and_check(make_stack, seconds=20, clients=8)
    print("storm:", figures)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_many_clients_on_colliding_names(make_stack):
    figures = storm_and_check(make_stack, seconds=240, clients=12)
    print("soak:", figures)
