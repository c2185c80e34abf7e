"""A deadline for a whole one-shot CLI command.

Each HTTP request already has its own timeout (`KeyServiceClient(timeout=...)`).
This guards everything around them: start-up, connection teardown, the event
loop's shutdown, anything that does not honour cancellation. A command past its
deadline says so on stderr (one JSON line, then every thread's stack, so the
place it stuck is on record) and exits 3, "unreachable", instead of hanging
until whoever ran it gives up (seen once in CI: a `vault create` that printed
nothing for 120 s, then was killed).
"""
import faulthandler
import json
import os
import sys
import threading

EXIT_UNAVAILABLE = 3
BACKSTOP = 5.0  # seconds after the deadline: exit even if the interpreter itself is stuck


def arm(seconds: float, what: str) -> None:
    """Exit the process with EXIT_UNAVAILABLE if it still runs `seconds` from now."""

    def expire():
        message = (f"{what}: not done within its deadline of {seconds:g} s "
                   "(the stack of every thread follows)")
        sys.stderr.write(json.dumps({"error": {"code": "Timeout", "message": message}}) + "\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(EXIT_UNAVAILABLE)

    # A Python thread can print the clear message; it needs the GIL. faulthandler's own
    # watchdog thread does not, so it still ends a process whose main thread holds it.
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + BACKSTOP, exit=True)
