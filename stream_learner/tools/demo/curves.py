"""The demo's accuracy curves: one rolling window over the answered requests, live and without learning.

One rolling window (``DemoConfig.rolling_window`` requests, in request order)
makes the accuracy curves: the plot draws them and the summary's worst point
and recovery are read off the same curves (:class:`Curves`), so the two never
disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .app import Served
from .baseline import Baseline
from .variants import VariantRun


def rolling(correct: Sequence[bool], window: int) -> list[float]:
    """Accuracy over the last ``window`` requests at each request (fewer at the start).

    >>> rolling([True, False, True, True], 2)
    [1.0, 0.5, 0.5, 1.0]
    """
    out, total = [], 0
    for i, c in enumerate(correct):
        total += c
        if i >= window:
            total -= correct[i - window]
        out.append(total / min(i + 1, window))
    return out


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``.

    >>> quantile([3.0, 1.0, 2.0, 4.0], 0.5), quantile([], 0.5)
    (2.0, None)
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Curves:
    """The rolling accuracy of what was served, and of the static baseline, per answered request.

    ``index`` holds the answered requests in request order; ``live[n]`` and
    ``static[n]`` are the accuracies over the ``window`` answered requests
    ending at ``index[n]`` (``static`` is ``None`` without a baseline; before
    its first request it equals ``live``: both worlds served the same).
    """

    window: int
    index: list[int]
    live: list[float]
    static: list[float] | None
    variants: dict[str, list[float]] = field(default_factory=dict)  # a node following each, replayed

    @classmethod
    def of(
        cls,
        served: Sequence[Served | None],
        window: int,
        baseline: Baseline | None,
        variants: Sequence[VariantRun] = (),
    ) -> Curves:
        """The curves of a run (``variants``: those a node following them was replayed for)."""
        index = [i for i, s in enumerate(served) if s is not None]
        live = rolling([s.correct for s in served if s is not None], window)
        static = None
        if baseline is not None:
            static = rolling([bool(baseline.correct[i]) for i in index], window)
        replayed = {
            v.name: rolling([bool(v.correct[i]) for i in index], window) for v in variants if v.correct is not None
        }
        return cls(window, index, live, static, replayed)

    def full_after(self, request: int) -> list[int]:
        """Positions whose window holds only requests from ``request`` on."""
        start = next((n for n, i in enumerate(self.index) if i >= request), len(self.index))
        return list(range(start + self.window - 1, len(self.index)))
