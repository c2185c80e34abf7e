"""The server's command table (nbdserver.server.COMMANDS) against the protocol's checks:
every command `transmission.check` lets through has an entry, and no entry is dead."""

from __future__ import annotations

from nbdserver.protocol.constants import (
    NBD_CMD_DISC,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
)
from nbdserver.protocol.transmission import Request, check
from nbdserver.server import COMMANDS

# Everything advertised, so only the command itself decides.
ALL = (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM
       | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_SEND_CACHE)


def accepted(cmd: int) -> bool:
    err, _ = check(Request(cmd, 0, 1, 0, 4096), 1 << 20, ALL, has_meta=True)
    return err == 0


def test_every_command_the_checks_accept_has_an_entry_and_no_other():
    commands = {cmd for cmd in range(1 << 16) if accepted(cmd)} - {NBD_CMD_DISC}
    assert commands == set(COMMANDS)


def test_only_read_and_write_may_start_on_the_event_loop():
    assert {cmd for cmd, (_, inline) in COMMANDS.items() if inline} == {NBD_CMD_READ, NBD_CMD_WRITE}
