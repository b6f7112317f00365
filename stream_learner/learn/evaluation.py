"""Prequential metrics: cumulative and rolling means with JSON-able state.

>>> m = Mean(window=2)
>>> for v in (1.0, 0.0, 0.0):
...     m.update(v)
>>> m.cumulative, m.rolling
(0.3333333333333333, 0.0)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from ..events import class_name

_UNSEEN: Any = object()


class Mean:
    """A cumulative mean and a mean over the last ``window`` values."""

    def __init__(self, window: int = 1000) -> None:
        self.window = window
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=self.window)

    def update(self, value: float) -> None:
        """Add one value."""
        self.n += 1
        self.total += value
        self.recent.append(value)

    def update_many(self, values: list[float]) -> None:
        """:meth:`update` with each value in turn (the same sum, bit for bit: added in order)."""
        total = self.total
        for value in values:
            total += value
        self.total = total
        self.n += len(values)
        self.recent.extend(values)

    @property
    def cumulative(self) -> float:
        """Mean of every value so far (NaN before any)."""
        return self.total / self.n if self.n else math.nan

    @property
    def rolling(self) -> float:
        """Mean of the last ``window`` values (recomputed exactly, not drifted by float error)."""
        return math.fsum(self.recent) / len(self.recent) if self.recent else math.nan

    def state(self) -> dict[str, Any]:
        """JSON-able state."""
        return {"n": self.n, "total": self.total, "recent": list(self.recent)}

    def restore(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self._reset()
        self.n, self.total = int(state["n"]), float(state["total"])
        self.recent.extend(float(v) for v in state["recent"])


class Scoreboard:
    """Named :class:`Mean` metrics (``accuracy``, ``log_loss``, ``served_accuracy``, ...)."""

    def __init__(self, names: list[str], window: int = 1000) -> None:
        self.means = {name: Mean(window) for name in names}

    def update(self, name: str, value: float) -> None:
        """Add one value to metric ``name``."""
        self.means[name].update(value)

    def update_many(self, name: str, values: list[float]) -> None:
        """Add values, in order, to metric ``name``."""
        self.means[name].update_many(values)

    def summary(self) -> dict[str, float]:
        """``<name>`` (cumulative) and ``<name>_rolling`` for every metric with data; finite only."""
        out: dict[str, float] = {}
        for name, mean in self.means.items():
            if mean.n:
                out[name] = mean.cumulative
                out[f"{name}_rolling"] = mean.rolling
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def state(self) -> dict[str, Any]:
        """JSON-able state."""
        return {name: m.state() for name, m in self.means.items()}

    def restore(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        for name, s in state.items():
            self.means[name].restore(s)


class ServedClasses:
    """What the application served, by class index: scores the *served* prediction of an example.

    >>> ServedClasses({"no": 0, "yes": 1}).of({"yes": 0.8, "no": 0.2, "maybe": 0.0})
    (1, {1: 0.8, 0: 0.2})
    """

    def __init__(self, class_index: Mapping[str, int]) -> None:
        self.class_index = class_index
        self.index: dict[Any, int | None] = {}  # probability key as served -> class index

    def of(self, prediction: Any) -> tuple[int, dict[int, float]] | None:
        """The class served (the most probable) and the probabilities by class index, or ``None``."""
        if not isinstance(prediction, dict):
            return None
        index = self.index
        probs: dict[int, float] = {}
        for k, v in prediction.items():
            i = index.get(k, _UNSEEN)
            if i is _UNSEEN:
                i = self.class_index.get(class_name(k))
                if len(index) < 4096:  # probability keys are the class names: a handful
                    index[k] = i
            if i is not None:
                probs[i] = v
        if not probs:
            return None
        return max(probs, key=probs.__getitem__), probs
