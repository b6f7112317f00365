"""Exponential back-off whose waits a stop event ends at once.

>>> b = Backoff(0.1, 1.0)
>>> [b.next_delay() for _ in range(6)]
[0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
>>> b.reset(); b.next_delay()
0.1
>>> import threading
>>> stop = threading.Event(); stop.set()
>>> Backoff(60.0, 60.0).sleep(stop)   # a set stop event ends the wait at once
False
"""

from __future__ import annotations

import random
import threading


class Backoff:
    """Delays that double from ``first`` up to ``limit`` seconds, with optional jitter.

    ``jitter`` is the fraction of each delay drawn at random (0.2: the delay
    is 80-100% of its nominal value), so that many clients that failed
    together do not retry together.
    """

    def __init__(
        self, first: float = 0.1, limit: float = 5.0, *, jitter: float = 0.0, rng: random.Random | None = None
    ) -> None:
        if not 0 < first <= limit:
            raise ValueError(f"back-off needs 0 < first <= limit, got {first} and {limit}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.first = first
        self.limit = limit
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.attempts = 0

    def next_delay(self) -> float:
        """The next delay (seconds); each call doubles the nominal one, up to ``limit``."""
        nominal = min(self.first * 2.0 ** min(self.attempts, 64), self.limit)
        self.attempts += 1
        if self.jitter:
            return nominal * (1.0 - self.jitter * self.rng.random())
        return nominal

    def reset(self) -> None:
        """Start again from ``first`` (after a success)."""
        self.attempts = 0

    def sleep(self, stop: threading.Event | None = None) -> bool:
        """Wait the next delay; False if ``stop`` was set before or during the wait."""
        delay = self.next_delay()
        if stop is None:
            threading.Event().wait(delay)
            return True
        return not stop.wait(delay)
