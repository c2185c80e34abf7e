"""Open on attach (issue 22, item 1): a disk's DEK is in the server's memory only while a
client has it selected (NBD_OPT_GO / NBD_OPT_EXPORT_NAME), and for the idle window after
the last one left; NBD_OPT_INFO and NBD_OPT_LIST open nothing. `disk show` tells
Unattached from Attached, and who is attached since when. Revocation refuses an
unattached disk's clients with the usual generic error, and a client that attaches while
the previous connection is closing finds every acknowledged write.
"""

from __future__ import annotations

import errno
import os
import threading

import nbd
import pytest

from nbdserver.server import MAX_FAILED_SELECTIONS
from tests.helpers.platform import connect_refused, pattern, refusal_message
from tests.helpers.servers import wait_until
from tests.platform.test_platform_revocation import _memory_hits, encoded_forms


@pytest.fixture
def at_once(make_stack):
    """A stack whose disks close as soon as their last client leaves."""
    return make_stack(nbd_args=["--idle-close-seconds", "0"])


def _needles(stack, disk):
    dek = stack.dek(disk)
    return {"dek": dek, "key1": dek[:32], "key2": dek[32:], **encoded_forms(dek)}


def _info_only(stack, disk):
    """NBD_OPT_INFO then NBD_OPT_ABORT: the client learns the size, selects nothing."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(stack.nbd_uri(disk))
    h.opt_info()
    size = h.get_size()
    try:
        h.opt_list(lambda name, description: 0)
    except nbd.Error:
        pass  # refused by the default --export-list policy; asked all the same
    h.opt_abort()
    return size


def test_dek_is_in_memory_only_while_attached(at_once):
    stack = at_once
    root = os.geteuid() == 0
    c = stack.customer_key("att", "k1", "des-att")
    stack.create_disk("a1", "--size", "16M", "--des", c["des"])
    needles = _needles(stack, "a1")
    shown = stack.disk("a1")
    assert shown["diskState"] == "Unattached" and shown["serving"]["keyLoaded"] is False
    if root:
        assert _memory_hits(stack.nb.pid, needles) == {}, "an unattached disk's DEK is in memory"

    assert _info_only(stack, "a1") == 16 << 20
    assert stack.disk("a1")["serving"]["keyLoaded"] is False
    if root:
        assert _memory_hits(stack.nb.pid, needles) == {}, "NBD_OPT_INFO opened the disk"

    h = stack.connect("a1")
    h.pwrite(b"x" * 65536, 0)
    h.flush()
    shown = stack.disk("a1")
    assert shown["diskState"] == "Attached" and shown["serving"]["keyLoaded"] is True
    [client] = shown["serving"]["clients"]
    assert client["peer"].startswith("127.0.0.1:") and client["since"].endswith("Z")  # RFC 3339
    if root:
        assert _memory_hits(stack.nb.pid, needles), "the scan must see the DEK while attached"

    h.shutdown()
    wait_until(lambda: stack.disk("a1")["serving"]["keyLoaded"] is False, 10,
               what="the DEK to be wiped after the last client left")
    assert stack.disk("a1")["diskState"] == "Unattached"
    if root:
        assert _memory_hits(stack.nb.pid, needles) == {}, "a detached disk's DEK stayed in memory"
    h = stack.connect("a1")  # opens again, same data
    assert h.pread(65536, 0) == b"x" * 65536
    h.shutdown()


def test_idle_window_keeps_the_key_until_it_passes(stack):
    """The default window (60 s): a client that leaves does not make the next one wait."""
    stack.create_disk("idle1", "--size", "4M")
    h = stack.connect("idle1")
    h.shutdown()
    shown = stack.disk("idle1")
    assert shown["diskState"] == "Unattached" and shown["serving"]["keyLoaded"] is True


def test_revoked_key_refuses_go_on_an_unattached_disk(stack):
    c = stack.customer_key("att-rv", "k1", "des-att-rv")
    stack.create_disk("rv1", "--size", "4M", "--des", c["des"])
    h = stack.connect("rv1")
    h.pwrite(pattern(7, 4096), 4096)
    h.shutdown()
    stack.keyservice("key", "disable", "att-rv", "k1")
    stack.wait_serving("rv1", "locked")
    assert connect_refused(stack, "rv1")
    assert refusal_message(stack, "rv1") == "export 'rv1' is not available"
    # The locked, unattached disk still takes a snapshot (ciphertext, no key needed).
    stack.nbdserver("snapshot", "create", "rv1-snap", "--disk", "rv1", "--quiet")
    stack.keyservice("key", "enable", "att-rv", "k1")
    stack.wait_serving("rv1")
    h = stack.connect("rv1")
    assert h.pread(4096, 4096) == pattern(7, 4096)
    h.shutdown()


def test_attach_while_the_previous_connection_closes(at_once):
    """Each round: a client writes (partial sectors too) and disconnects while the next
    client attaches; every write acknowledged so far reads back on the new connection."""
    stack = at_once
    stack.create_disk("hand", "--size", "4M")
    acked: dict[int, bytes] = {}
    h = stack.connect("hand")
    for i in range(40):
        data = pattern(i, 6144)
        off = (i % 16) * 8192 + 512  # not sector-aligned: read-modify-write at both ends
        h.pwrite(data, off)
        acked[off] = data
        leaving = threading.Thread(target=h.shutdown)
        leaving.start()
        h = stack.connect("hand")  # attaches while the last one closes (or just closed)
        leaving.join(30)
        for o, d in acked.items():
            assert h.pread(len(d), o) == d, f"round {i}: the write at {o} was lost"
    h.shutdown()
    assert "disk hand closed, DEK wiped" in stack.nb.stderr_text()


def test_a_go_whose_disk_cannot_open_is_refused_and_the_client_may_go_on(at_once):
    """The name is known and not locked, so the handshake accepts the GO; opening the disk
    then fails (its file was cut short). The client gets the spec's "not available" error
    to that GO, not a dropped connection, and may ask again on the same connection."""
    stack = at_once
    stack.create_disk("cut", "--size", "4M")
    stack.create_disk("fine", "--size", "4M")
    path = stack.nb_dir / stack.disk("cut")["file"]
    os.truncate(path, 4096)
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(stack.nbd_uri("cut"))
    with pytest.raises(nbd.Error) as e:
        h.opt_go()
    # NBD_REP_ERR_UNKNOWN ("the requested export is not available"), as libnbd reports it.
    assert e.value.errno == errno.errorcode[errno.ENOENT], e.value
    assert h.aio_is_negotiating()  # still in option haggling, not disconnected
    h.set_export_name("fine")
    h.opt_go()  # the same connection selects another disk
    h.pwrite(b"f" * 4096, 0)
    assert h.pread(4096, 0) == b"f" * 4096
    h.shutdown()
    assert "export 'cut' could not be opened" in stack.nb.stderr_text()

    # Each failed selection asked the key service for a DEK: a client looping on one
    # connection is answered twice, then the third answer is the last.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(stack.nbd_uri("cut"))
    for _ in range(MAX_FAILED_SELECTIONS):
        with pytest.raises(nbd.Error) as e:
            h.opt_go()
        assert e.value.errno == errno.errorcode[errno.ENOENT], e.value
    h.set_export_name("fine")
    with pytest.raises(nbd.Error) as e:  # the server closed after the last answer
        h.opt_go()
    assert "disconnected" in str(e.value) or not h.aio_is_negotiating(), e.value
    assert f"{MAX_FAILED_SELECTIONS} selections failed; closing" in stack.nb.stderr_text()
