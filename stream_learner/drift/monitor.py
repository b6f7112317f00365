"""The drift monitor: named detectors by signal, their findings and their state."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import msgspec

from .detectors import ADWINDetector, Detector, PageHinkleyDetector, Signal
from .state import STATE_FORMAT, IncompatibleStateError, MonitorState, check_format, convert


@dataclasses.dataclass(frozen=True, slots=True)
class DriftFinding:
    """A warning or a drift: which detector, on which signal, for which value of which example."""

    detector: str
    signal: str
    kind: Literal[Signal.WARNING, Signal.DRIFT]
    value: float
    index: int


class DriftMonitor:
    """Several named detectors, each on one signal; the trainer feeds every signal it has.

    >>> from stream_learner.drift import ADWINDetector
    >>> monitor = DriftMonitor([ADWINDetector("confidence")])
    >>> monitor.signals
    frozenset({'confidence'})
    >>> monitor.observe("loss", 0.7, index=0)    # nobody watches the loss: nothing to do
    []
    """

    def __init__(self, detectors: Iterable[Detector]) -> None:
        self._detectors: dict[str, Detector] = {}
        for det in detectors:
            if not isinstance(det, Detector):
                raise TypeError(f"{det!r} does not implement the Detector protocol")
            if det.name in self._detectors:
                raise ValueError(f"two detectors are named {det.name!r}")
            self._detectors[det.name] = det
        self._by_signal: dict[str, list[Detector]] = {}
        for det in self._detectors.values():
            self._by_signal.setdefault(det.signal, []).append(det)

    @classmethod
    def default(cls) -> DriftMonitor:
        """The default detectors: ADWIN on the error and on the confidence, Page-Hinkley on the loss.

        >>> {name: det.signal for name, det in DriftMonitor.default().detectors.items()}
        {'adwin_error': 'error', 'page_hinkley_loss': 'loss', 'adwin_confidence': 'confidence'}
        """
        return cls([
            ADWINDetector("error"),
            PageHinkleyDetector("loss"),
            # Label-free: the model's confidence moves as soon as its inputs do, long before labels arrive.
            ADWINDetector("confidence"),
        ])

    @classmethod
    def from_config(cls, config: None = None) -> DriftMonitor:
        """:meth:`default`, under its old name: ``learn.trainer.drift_from_settings`` still calls it.

        Drift configuration tables are gone (the settings never accepted
        them); build from the settings with :func:`stream_learner.drift.from_settings`.
        """
        if config is not None:
            raise TypeError("drift configuration tables were removed: use DriftMonitor([...detectors]) "
                            "or stream_learner.drift.from_settings")
        return cls.default()

    @property
    def detectors(self) -> Mapping[str, Detector]:
        """The detectors by name."""
        return MappingProxyType(self._detectors)

    @property
    def signals(self) -> frozenset[str]:
        """The signals some detector watches (the trainer may skip computing the others)."""
        return frozenset(self._by_signal)

    def observe(self, signal: str, value: float, *, index: int) -> list[DriftFinding]:
        """Feed ``value`` of ``signal`` for example ``index`` to the detectors watching it.

        ``index`` is the example's position in the trainer's input (the same on
        a replay), carried into findings and event ids. A non-finite value
        raises ``ValueError`` before any detector sees it.
        """
        detectors = self._by_signal.get(signal)
        if not detectors:
            return []
        x = float(value)
        if not math.isfinite(x):
            raise ValueError(f"{signal} value {value!r} for example {index} is not a finite number")
        findings = []
        for det in detectors:
            sig = det.update(x)
            if sig is not Signal.NONE:
                findings.append(DriftFinding(det.name, signal, sig, x, index))
        return findings

    def observe_many(self, signal: str, values: list[float], *,
                     indices: list[int]) -> tuple[list[tuple[int, DriftFinding]], dict[str, list[float]]]:
        """:meth:`observe` of each value in turn (``indices[j]`` is the example index of
        ``values[j]``), with the same detector state and findings, fed a detector at a time.

        Returns the findings with the position of their value, in the order a loop of
        :meth:`observe` returns them (by position, then detector), and each detector's
        ``estimation`` after every value (NaN for a detector without one). A non-finite value
        raises ``ValueError`` after every detector was fed the values before it, as the loop would.
        """
        detectors = self._by_signal.get(signal)
        if not detectors:
            return [], {}
        xs = [float(v) for v in values]
        if not all(map(math.isfinite, xs)):
            bad = next(j for j, x in enumerate(xs) if not math.isfinite(x))
            self.observe_many(signal, xs[:bad], indices=indices[:bad])
            raise ValueError(f"{signal} value {values[bad]!r} for example {indices[bad]} is not a finite number")
        found: list[tuple[int, int, DriftFinding]] = []
        estimates: dict[str, list[float]] = {}
        for order, det in enumerate(detectors):
            many = getattr(det, "update_many", None)
            if many is not None:
                signals, estimates[det.name] = many(xs)
            else:
                signals, est = [], []
                for j, x in enumerate(xs):
                    sig = det.update(x)
                    if sig is not Signal.NONE:
                        signals.append((j, sig))
                    est.append(getattr(det, "estimation", math.nan))
                estimates[det.name] = est
            found.extend((j, order, DriftFinding(det.name, signal, sig, xs[j], indices[j])) for j, sig in signals)
        found.sort(key=lambda f: (f[0], f[1]))
        return [(j, finding) for j, _, finding in found], estimates

    def state(self) -> dict[str, Any]:
        """Every detector's state, by name (a ``MonitorState``), as JSON-able data."""
        detectors = {name: det.state() for name, det in self._detectors.items()}
        state = MonitorState(format=STATE_FORMAT, detectors=detectors)
        return msgspec.to_builtins(state)  # type: ignore[no-any-return]

    def restore(self, state: Mapping[str, Any]) -> dict[str, str]:
        """Continue from :meth:`state`; return the detectors that start fresh instead, with the reason.

        A configured detector starts fresh when the saved state has none of
        its name, or was saved with another kind, signal or parameters (the
        configuration changed between runs), or in an older state format (a
        snapshot of an earlier version). Saved detectors no longer configured
        are ignored. A malformed state raises :class:`DriftStateError` and
        leaves every detector as it was.
        """
        try:
            check_format(state, "drift monitor")
        except IncompatibleStateError as exc:
            return {name: str(exc) for name in self._detectors}
        saved = convert(state, MonitorState, "drift monitor").detectors
        fresh: dict[str, str] = {}
        restored: dict[str, Detector] = {}
        for name, det in self._detectors.items():
            if name not in saved:
                fresh[name] = "no saved state"
                continue
            # Restore into a copy so a failure part-way leaves every detector untouched.
            candidate = copy.deepcopy(det)
            try:
                candidate.restore(saved[name])
            except IncompatibleStateError as exc:
                fresh[name] = str(exc)
                continue
            restored[name] = candidate
        for name, det in restored.items():
            self._detectors[name] = det
            signal_detectors = self._by_signal[det.signal]
            signal_detectors[:] = [restored.get(d.name, d) for d in signal_detectors]
        return fresh

