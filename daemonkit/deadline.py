"""A deadline for a whole one-shot CLI command (both CLIs).

Each HTTP request already has its own timeout. This guards everything around them:
start-up, connection teardown, the event loop's shutdown, anything that does not honour
cancellation. A command past its deadline says so on stderr (the CLIs' error shape, then
every thread's stack, so the place it stuck is on record) and exits 3, "unavailable",
instead of hanging until whoever ran it gives up (seen once in CI: a `vault create` that
printed nothing for 120 s, then was killed).

A command that follows a long operation re-arms its deadline after each answer: the
deadline bounds a stall, not an operation that is honestly making progress.
"""
import faulthandler
import os
import sys
import threading

from .cliout import EXIT_UNAVAILABLE, CliError, report_error

BACKSTOP = 5.0  # seconds after the deadline: exit even if the interpreter itself is stuck

_timer: threading.Timer | None = None


def arm(seconds: float, what: str, fmt: str | None = None) -> None:
    """Exit the process with EXIT_UNAVAILABLE if it still runs `seconds` from now; a later
    call replaces the earlier deadline."""
    global _timer

    def expire():
        report_error(CliError(f"{what}: not done within its deadline of {seconds:g} s "
                              "(the stack of every thread follows)", code="Timeout",
                              exit_code=EXIT_UNAVAILABLE), fmt)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(EXIT_UNAVAILABLE)

    if _timer is not None:
        _timer.cancel()
    # A Python thread can print the clear message; it needs the GIL. faulthandler's own
    # watchdog thread does not, so it still ends a process whose main thread holds it.
    _timer = threading.Timer(seconds, expire)
    _timer.daemon = True
    _timer.start()
    faulthandler.dump_traceback_later(seconds + BACKSTOP, exit=True)
