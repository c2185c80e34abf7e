"""Time as a dependency, so retention and expiry rules are testable without waiting."""
import time
from collections.abc import Callable

Clock = Callable[[], float]  # seconds since the epoch


def system_clock() -> float:
    return time.time()
