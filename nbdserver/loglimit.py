"""Log lines an outsider can trigger, at a bounded rate.

A refusal that anyone who reaches the port can cause (a connection over a cap, a
handshake that never ends, a request for a locked disk) is worth a line to the operator,
but one line per attempt would let a flood fill the disk with logs. `LogLimiter` lets
one line per key through per interval and counts the rest into the next line.
"""

from __future__ import annotations

import logging
import time

KEYS = 4096  # keys remembered at once (peers, mostly); past it every key starts afresh


class LogLimiter:
    def __init__(self, logger: logging.Logger, interval: float = 10.0, *, clock=time.monotonic):
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args) -> bool:
        """Log `msg % args` unless a line for `key` went out less than an interval ago;
        True when it was logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if len(self._last) > KEYS:  # keys come from the network: keep the tables bounded
            self._forget(level)
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, n, self._interval)
        self._log.log(level, msg, *args)
        return True

    def _forget(self, level: int) -> None:
        """Start every key afresh. The counts of lines held back go too (else a flood
        from ever new peers, each refused twice, would grow them without end), so they
        are said once here instead of in each key's next line."""
        held, keys = sum(self._suppressed.values()), len(self._suppressed)
        self._last.clear()
        self._suppressed.clear()
        if held:
            self._log.log(level, "over %d sources of refusals: %d line(s) held back for %d of "
                          "them are not counted further", KEYS, held, keys)
