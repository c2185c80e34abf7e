"""LogLimiter (nbdserver/loglimit.py): one line per key per interval, and tables that
stay bounded whatever the number of keys a network flood brings."""

from __future__ import annotations

import logging

from nbdserver.loglimit import KEYS, LogLimiter


def test_a_flood_of_new_sources_each_refused_twice_stays_bounded(caplog):
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("test.loglimit"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.loglimit"):
        for i in range(3 * KEYS):  # ever new peers, each refused twice within the interval
            key = f"refused 2001:db8::{i:x}"
            assert limiter.log(key, logging.INFO, "refused %s", i)
            assert not limiter.log(key, logging.INFO, "refused %s", i)
    # Both tables are bounded: the held-back counts went with the keys they belonged to...
    assert len(limiter._last) <= KEYS + 1
    assert len(limiter._suppressed) <= KEYS + 1
    # ...and were said, not lost silently.
    summaries = [r.getMessage() for r in caplog.records if "not counted further" in r.getMessage()]
    assert len(summaries) == 2 and all(f"held back for {KEYS + 1} of them" in m for m in summaries)


def test_one_line_per_key_per_interval_then_the_count_of_the_rest():
    now = [0.0]
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test.loglimit.count")
    logger.addHandler(Capture())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    limiter = LogLimiter(logger, 10.0, clock=lambda: now[0])
    assert limiter.log("k", logging.INFO, "refused")
    assert not limiter.log("k", logging.INFO, "refused")
    assert not limiter.log("k", logging.INFO, "refused")
    now[0] = 10.0
    assert limiter.log("k", logging.INFO, "refused")
    assert lines == ["refused", "refused (and 2 more like it in the last 10 s)"]
