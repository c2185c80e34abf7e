"""RFC 3339 times (UTC, "2026-12-06T07:55:00Z"): what the CLIs print, and what a person
may type where a time is asked for (`audit show --since`, `key update --expires`)."""

from __future__ import annotations

import datetime


def format_time(seconds: float) -> str:
    """Epoch seconds as RFC 3339 in UTC, whole seconds (the APIs' resolution)."""
    t = datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    """RFC 3339 ("2026-12-06T07:55:00Z", "...+01:00", fractions allowed) -> epoch seconds.
    An offset is required: a time without one means a different instant on every host."""
    try:
        t = datetime.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        t = None
    if t is None or t.tzinfo is None or "T" not in text.upper():
        raise ValueError(f"{text!r} is not an RFC 3339 time with an offset "
                         "(e.g. 2026-12-06T07:55:00Z)")
    return t.timestamp()
