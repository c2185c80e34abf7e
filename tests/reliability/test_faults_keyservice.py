"""The key service slow, partitioned away, then down, with a busy disk attached.

The NBD server reaches the key service through a `FaultyLink` (tests/reliability/
netfault.py). With a 1 s lease and a 15 s grace period:

- slow (each request delayed 1.5 s, below the client's 10 s timeout): the checks pass,
  late; the disk keeps serving and no write fails;
- partitioned (nothing answered, connections held): checks time out after 10 s; the
  platform logs that the key service is unreachable and keeps serving on the DEK it
  holds, inside the grace period;
- down (connections reset): the grace period runs out and the disk is closed: EIO to
  requests; acknowledged writes are intact;
- back: at the first successful check the disk serves again on the same connection.
"""

from __future__ import annotations

import pytest

from tests.helpers.platform import Stack, Writer, wait_for_eio, wait_for_io
from tests.helpers.servers import wait_until
from tests.reliability.netfault import FaultyLink, Link

LEASE, GRACE = 1, 15


@pytest.fixture
def linked_stack(tmp_path):
    stack = Stack(tmp_path / "stack", lease=LEASE, grace=GRACE)
    stack.start_keyservice()
    link = FaultyLink(("127.0.0.1", stack.ks.port), delay=1.5)
    stack.nbd_args = ["--keyservice-url", link.url]  # the last one given wins
    stack.start_nbdserver()
    yield stack, link
    link.close()
    try:
        stack.assert_healthy()
        assert "Traceback" not in stack.logs()
    finally:
        stack.close()


def test_keyservice_slow_partitioned_down_and_back(linked_stack):
    stack, link = linked_stack
    stack.create_disk("busy", "--size", "16M")
    stack.wait_serving("busy")
    w = Writer(stack, "busy", span=2 << 20, block=16 << 10)
    w.start()
    try:
        # Slow: several lease checks go through the delay; nothing fails.
        link.set(Link.SLOW)
        start = link.delayed
        wait_until(lambda: link.delayed >= start + 4, 30, what="checks through the slow link")
        assert w.error is None, w.error
        assert stack.serving_state("busy") == "available"

        # Partitioned: the platform notices and keeps serving inside the grace period.
        link.set(Link.PARTITIONED)
        wait_until(lambda: "key service unreachable" in stack.nb.stderr_text(), 30,
                   what="the platform to log the unreachable key service")
        before = w.count
        wait_until(lambda: w.count > before + 20 or w.error, 10, what="writes during the partition")
        assert w.error is None, f"a write failed inside the grace period: {w.error}"
        assert stack.serving_state("busy") == "available"

        # Down: the grace period runs out; the disk is closed.
        link.set(Link.DOWN)
        wait_until(lambda: w.error is not None, GRACE + 20, what="the disk to close after the grace")
        wait_for_eio(w.h)
        assert "grace period" in stack.nb.stderr_text()
    finally:
        w.stop()
    # Back: the disk serves again without a reconnect, and every acknowledged write is there.
    link.set(Link.PASS)
    wait_for_io(w.h, timeout=30)
    w.verify()
    w.close()
    print(f"\nfaulty link: relayed={link.relayed} delayed={link.delayed} refused={link.refused}")
