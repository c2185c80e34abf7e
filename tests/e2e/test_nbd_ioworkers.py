"""`python -m nbdserver.baseline --io-processes 2`: the runner without the platform hands
its connections to I/O worker processes too (issue 14, item 1), an encrypted export's key
included, and one disk stays one disk across them (the platform's side, revocation and
snapshots: tests/platform/test_platform_ioworkers.py)."""

from __future__ import annotations

import os

import nbd

from tests.helpers.platform import pattern
from tests.helpers.procs import children, connections_held
from tests.helpers.servers import wait_until


def test_an_encrypted_export_is_served_by_two_workers_as_one_disk(server_factory, tmp_path):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32) + os.urandom(32))
    key.chmod(0o600)
    srv = server_factory([f"x={tmp_path / 'x.img'},size=16M,key={key}"],
                         extra_args=["--io-processes", "2"])
    wait_until(lambda: srv.stderr_text().count("I/O worker") >= 2 and
               all(f"I/O worker {pid} ready" in srv.stderr_text() for pid in children(srv.pid)),
               20, what="two I/O workers ready")
    handles = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_uri(srv.uri("x"))
        handles.append(h)
    a, b = handles

    def spread():
        held = connections_held([srv.pid, *children(srv.pid)], srv.port)
        return held if held[srv.pid] == 0 and sorted(held.values()) == [0, 1, 1] else None
    wait_until(spread, 10, what="one connection on each worker, none in the main process")
    a.pwrite(pattern(3, 65536), 0)
    b.pwrite(pattern(4, 4096), 1 << 20)
    assert b.pread(65536, 0) == pattern(3, 65536)
    assert a.pread(4096, 1 << 20) == pattern(4, 4096)
    b.flush()
    for h in handles:
        h.shutdown()
    data = (tmp_path / "x.img").read_bytes()[:65536]
    assert data != pattern(3, 65536), "the worker wrote plaintext: the key did not travel"
