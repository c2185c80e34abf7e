"""daemonkit.wipe: the one way both daemons zero a secret in place."""

from daemonkit.wipe import wipe
from keyservice import secret_http
from nbdserver.platform import keys


def test_wipe_zeroes_the_buffer_itself_not_a_copy():
    dek = bytearray(b"\x5a" * 64)
    view = memoryview(dek)  # what a reader of the same buffer holds
    wipe(dek)
    assert dek == bytearray(64) and view.tobytes() == bytes(64) and len(dek) == 64
    part = bytearray(b"\xff" * 8)
    wipe(memoryview(part)[2:6])
    assert part == bytearray(b"\xff\xff\x00\x00\x00\x00\xff\xff")
    wipe(None)  # nothing to wipe: an unwrap that failed


def test_both_daemons_use_it():
    assert keys.wipe is wipe and secret_http.wipe is wipe
