"""Drift signals in, findings that call for action out.

Detectors see any change of a signal's mean; the judge keeps only a change
for the worse (error or loss up, confidence down) as a finding for the
drift policy. The model getting better, as it does while it learns, is
counted as an ``improvement``, not acted on. It also keeps each detector's
estimate before the latest value, to tell worse from better across chunks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..drift import DriftFinding

if TYPE_CHECKING:
    from ..drift import DriftWatch

#: One signal's values in a chunk: (signal, values, the chunk rows they belong to).
SignalValues = tuple[str, list[float], list[int]]


class DriftJudge:
    """Feeds a chunk's signals to the drift monitor and judges what it finds."""

    def __init__(self, monitor: DriftWatch | None) -> None:
        self.monitor = monitor
        self.estimates: dict[str, float] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.names: dict[str, list[str]] = {}
        if monitor is not None:
            for name, det in monitor.detectors.items():
                self.names.setdefault(det.signal, []).append(name)

    def observe(self, signals: list[SignalValues], base: int) -> list[DriftFinding]:
        """Feed each signal's values to the detectors, a signal at a time; the findings for the worse.

        Findings are judged in the order feeding one example at a time would give: by row,
        then in the order of ``signals``, then by detector. Detectors watch one signal each,
        so feeding a signal's values in a batch leaves them exactly as feeding them one by one.
        Rows are indexed ``base + row`` in the findings.
        """
        monitor = self.monitor
        if monitor is None:
            return []
        found: list[tuple[int, int, DriftFinding, float, float]] = []
        for order, (signal, values, rows) in enumerate(signals):
            if not values:
                continue
            findings, estimates = monitor.observe_many(signal, values, indices=[base + r for r in rows])
            for j, finding in findings:
                est = estimates[finding.detector]
                before = est[j - 1] if j else self.estimates.get(finding.detector, math.nan)
                found.append((rows[j], order, finding, before, est[j]))
            for name in self.names.get(signal, ()):
                self.estimates[name] = estimates[name][-1]
        found.sort(key=lambda f: (f[0], f[1]))
        return [
            finding
            for _, order, finding, before, after in found
            if self._worse(signals[order][0], finding, before, after)
        ]

    def _worse(self, signal: str, finding: DriftFinding, before: float, after: float) -> bool:
        per = self.counts.setdefault(
            finding.detector, {"warning": 0, "drift": 0, "improvement": 0, "last_drift_index": -1}
        )
        worse = after < before if signal == "confidence" else after > before
        if not worse:
            per["improvement"] += 1
            return False
        per[finding.kind.value] += 1
        if finding.kind.value == "drift":
            per["last_drift_index"] = finding.index
        return True

    def save(self) -> dict[str, Any]:
        """JSON-able state, the monitor's included."""
        return {
            "drift_counts": self.counts,
            "estimates": self.estimates,
            "drift": self.monitor.state() if self.monitor is not None else None,
        }

    def load(self, meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`save` returned."""
        self.counts = {k: dict(v) for k, v in meta["drift_counts"].items()}
        self.estimates = {k: float(v) for k, v in meta["estimates"].items()}
        if self.monitor is not None and meta.get("drift") is not None:
            self.monitor.restore(meta["drift"])
