"""Injectable monotonic clocks: the real one, and a manual one that tests advance by hand."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]  # monotonic seconds

monotonic: Clock = time.monotonic


class ManualClock:
    """A clock that only moves when told to; call it like `time.monotonic`."""

    __slots__ = ("now",)

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        self.now += seconds
