"""Which version is served, the newest one followed, the pin, and the counters: one lock.

:class:`ServedVersions` makes every swap decision of a subscriber; the
subscriber does the reading and loading, then offers what it loaded here.
The rules:

* **never backwards**: a version offered from following is taken only if it
  is strictly newer than the newest followed (else it is counted stale);
* **pinned**: a newer version is remembered as followed, not served; only
  :meth:`~ServedVersions.pin` serves an older version, and
  :meth:`~ServedVersions.unpin` serves the newest followed again;
* **held**: while ``hold`` is set (a registry search at start not done yet,
  an alias not set), nothing newer is served either; :meth:`~ServedVersions.unpin`
  releases it;
* **one reference**: ``current`` changes by one assignment, under the lock;
  readers (every request) read it without the lock.

The lock guards ``current``, ``followed`` and ``pinned`` (each decision
reads and writes them together) and the counters of :meth:`~ServedVersions.counts`.
Nothing slow runs under it: no I/O, no callback, no logging (the subscriber
logs what the methods return).

>>> from stream_learner.serving.model import ServedModel
>>> def v(n): return ServedModel("m", n, None, None, 0.0)  # no manifest, no predictor: versions are all it needs
>>> versions = ServedVersions(pinned=None)
>>> [s.new.version if s else None for s in (versions.offer(v(2)), versions.offer(v(1)), versions.offer(v(3)))]
[2, None, 3]
>>> versions.pin(v(1))[0].version, versions.offer(v(4)), versions.current.version, versions.followed.version
(1, None, 1, 4)
>>> versions.unpin()[1].new.version, versions.counts()["stale_manifests"]
(4, 1)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from dataclasses import dataclass

from .model import ServedModel

__all__ = ["ServedVersions", "Swap"]


@dataclass(frozen=True, eq=False)
class Swap:
    """The served model changed from ``old`` (``None``: nothing served before) to ``new``."""

    new: ServedModel
    old: ServedModel | None


class ServedVersions:
    """The swap decisions of one model's subscriber (see the module docstring).

    ``current``, ``followed``, ``pinned`` and ``swaps`` may be read without
    the lock (one attribute read each); only the methods write them.
    """

    def __init__(self, *, pinned: int | None, hold: bool = False) -> None:
        self.current: ServedModel | None = None  # what requests use
        self.followed: ServedModel | None = None  # the newest good version; current unless pinned or held
        self.pinned = pinned
        self.hold = hold
        self.swaps = 0
        self._stale = 0
        self._failures: Counter[str] = Counter()  # by reason
        self._last_error: str | None = None
        self._last_swap_at: float | None = None
        self._lock = threading.Lock()

    def _make_current(self, served: ServedModel) -> Swap:
        """The swap itself, under the lock."""
        new = dataclasses.replace(served, loaded_at=time.time())
        swap = Swap(new, self.current)
        self.current = new  # the one reference assignment requests observe
        if self.followed is None or new.version > self.followed.version:
            self.followed = new
        self.swaps += 1
        self._last_swap_at = new.loaded_at
        return swap

    def offer(self, served: ServedModel) -> Swap | None:
        """A version newly loaded from following: swapped in, unless it is not newer (counted
        stale) or a version is pinned (then ``served`` becomes ``followed``, to serve on unpin)."""
        with self._lock:
            if self.followed is not None and served.version <= self.followed.version:
                self._stale += 1
                return None  # a concurrent pin got there first; never go back
            if self.pinned is not None or self.hold:
                self.followed = served
                return None
            return self._make_current(served)

    def pin(self, served: ServedModel) -> tuple[ServedModel, Swap | None]:
        """Pin ``served``'s version: the model current now, and the swap if it was not already."""
        with self._lock:
            self.pinned = served.version
            old = self.current
            if old is not None and old.version == served.version:
                return old, None
            swap = self._make_current(served)
        return swap.new, swap

    def hold_newer(self) -> None:
        """Serve nothing newer than what is served now (an alias not set: wait for it)."""
        with self._lock:
            self.hold = True

    def unpin(self) -> tuple[ServedModel | None, Swap | None] | None:
        """Serve the newest followed version again: ``None`` if neither pinned nor held, else the model
        current now and the swap, if that changed the served model."""
        with self._lock:
            if self.pinned is None and not self.hold:
                return None
            self.pinned, self.hold = None, False
            old, followed = self.current, self.followed
            swap = None
            if followed is None or (old is not None and old.version >= followed.version):
                # Pinned at the newest (or newer than the follower got to): keep
                # it, and never follow below it.
                if old is not None:
                    self.followed = old
            else:
                swap = self._make_current(followed)
        return (swap.new if swap is not None else old), swap

    def stale(self) -> None:
        """Count a manifest ignored for not being newer than the followed version."""
        with self._lock:
            self._stale += 1

    def failed(self, reason: str, message: str) -> None:
        """Count a failure under ``reason``; ``message`` becomes the last error."""
        with self._lock:
            self._failures[reason] += 1
            self._last_error = message

    @property
    def last_error(self) -> str | None:
        """``"reason: message"`` of the last failure, or ``None``."""
        return self._last_error

    def counts(self) -> dict[str, object]:
        """The versions and counters, read together (the subscriber's ``status()`` reports them)."""
        with self._lock:
            current, followed = self.current, self.followed
            return {
                "version": current.version if current else None,
                "pinned": self.pinned,
                "held": self.hold,
                "followed_version": followed.version if followed else None,
                "swaps": self.swaps,
                "failures": sum(self._failures.values()),
                "failures_by_reason": dict(self._failures),
                "last_error": self._last_error,
                "last_swap_at": self._last_swap_at,
                "stale_manifests": self._stale,
            }
