"""A long operation's progress on stderr, as the CLIs follow it.

On a terminal: one line rewritten in place, with bytes, rate and time left when the
operation says how many bytes it copies (`42% 1.2/2.9 GiB 85 MiB/s 0:20 left`). Elsewhere
(a log, a pipe, CI): a plain line at each tenth, so a log shows progress without a line
per poll. Rate and time left come from what was done since the first look, on this
host's monotonic clock.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

STEP = 10  # percent between two plain lines


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressLine:
    def __init__(self, what: str, stream: TextIO | None = None, clock=time.monotonic):
        self.what, self.stream, self.clock = what, stream or sys.stderr, clock
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._first: tuple[float, float] | None = None  # (time, fraction) at the first look
        self._last_step = -1
        self._drawn = False

    def update(self, fraction: float, total_bytes: int | None = None) -> None:
        now = self.clock()
        if self._first is None:
            self._first = (now, fraction)
        pct = int(fraction * 100)
        if self.tty:
            self.stream.write("\r" + self._line(now, fraction, total_bytes) + "\x1b[K")
            self._drawn = True
        elif pct // STEP != self._last_step:
            self._last_step = pct // STEP
            self.stream.write(self._line(now, fraction, total_bytes) + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, now: float, fraction: float, total: int | None) -> str:
        parts = [f"{self.what}: {int(fraction * 100):3d}%"]
        if total:
            parts.append(f"{human_bytes(fraction * total)} of {human_bytes(total)}")
        assert self._first is not None
        t0, f0 = self._first
        if now > t0 and fraction > f0:
            per_second = (fraction - f0) / (now - t0)
            if total:
                parts.append(f"{human_bytes(per_second * total)}/s")
            left = int((1 - fraction) / per_second) if fraction < 1 else 0
            parts.append(f"{left // 60}:{left % 60:02d} left")
        return ", ".join(parts)
