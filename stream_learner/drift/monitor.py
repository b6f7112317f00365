"""The drift monitor: named detectors by signal, their findings and their state; what the learner needs of it.

The learner depends on :class:`DriftWatch` only: it feeds a chunk's values of
one signal at a time to :meth:`~DriftWatch.observe_many`, reads each
detector's ``estimation`` to judge a finding (a change for the worse, or an
improvement), and keeps :meth:`~DriftWatch.state` in its snapshots.
:class:`DriftMonitor` is the implementation.

>>> watch: DriftWatch = DriftMonitor.default()
>>> findings, estimates = watch.observe_many("confidence", [0.9, 0.8], indices=[41, 42])
>>> findings, estimates
([], {'adwin_confidence': [0.9, 0.8500000000000001]})
>>> watch.detectors["adwin_confidence"].estimation
0.8500000000000001
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, runtime_checkable

import msgspec

from .detectors import ADWINDetector, Alarm, Detector, PageHinkleyDetector, Signal
from .state import STATE_FORMAT, IncompatibleStateError, MonitorState, check_format, convert


@dataclasses.dataclass(frozen=True, slots=True)
class DriftFinding:
    """A warning or a drift: which detector, on which signal, for which value of which example."""

    detector: str
    signal: str
    kind: Alarm
    value: float
    index: int


#: What :meth:`DriftWatch.observe_many` returns: the findings with the position of their value
#: in the batch, and each detector's estimation after every value, by detector name.
Observed: TypeAlias = tuple[list[tuple[int, DriftFinding]], dict[str, list[float]]]


class WatchedDetector(Protocol):
    """What the learner reads of a detector: the signal it watches and its estimate of the signal's level."""

    @property
    def signal(self) -> str:
        """``"error"``, ``"loss"``, ``"confidence"`` or ``"feature:<name>"``."""
        ...

    @property
    def estimation(self) -> float:
        """The detector's current estimate of the signal's level (e.g. the error rate)."""
        ...


@runtime_checkable
class DriftWatch(Protocol):
    """What the learner needs from drift detection; :class:`DriftMonitor` implements it."""

    @property
    def detectors(self) -> Mapping[str, WatchedDetector]:
        """The detectors by name (the names of findings and of the estimates)."""
        ...

    def observe_many(self, signal: str, values: Sequence[float], *, indices: Sequence[int]) -> Observed:
        """Feed ``values`` of ``signal`` (``indices[j]``: the example index of ``values[j]``) to the
        detectors watching it; the findings, by position then detector, and the estimates."""
        ...

    def state(self) -> dict[str, Any]:
        """The detectors' running state as JSON-able builtins (for a snapshot's JSON meta)."""
        ...

    def restore(self, state: Mapping[str, Any]) -> dict[str, str]:
        """Continue from a :meth:`state`; the detectors that start fresh instead, with the reason."""
        ...


class DriftMonitor:
    """Several named detectors, each on one signal: the :class:`DriftWatch` of the learner.

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
        return cls(
            [
                ADWINDetector("error"),
                PageHinkleyDetector("loss"),
                # Label-free: the model's confidence moves as soon as its inputs do, long before labels arrive.
                ADWINDetector("confidence"),
            ]
        )

    @property
    def detectors(self) -> Mapping[str, Detector]:
        """The detectors by name."""
        return MappingProxyType(self._detectors)

    @property
    def signals(self) -> frozenset[str]:
        """The signals some detector watches (the trainer may skip computing the others)."""
        return frozenset(self._by_signal)

    def observe(self, signal: str, value: float, *, index: int) -> list[DriftFinding]:
        """:meth:`observe_many` of one value: the findings for example ``index``.

        ``index`` is the example's position in the trainer's input (the same on
        a replay), carried into findings and event ids. A non-finite value
        raises ``ValueError`` before any detector sees it.
        """
        findings, _ = self.observe_many(signal, [value], indices=[index])
        return [finding for _, finding in findings]

    def observe_many(self, signal: str, values: Sequence[float], *, indices: Sequence[int]) -> Observed:
        """Feed ``values`` of ``signal`` to the detectors watching it, a detector at a time
        (``indices[j]`` is the example index of ``values[j]``, carried into findings and event ids).

        Returns the findings with the position of their value, by position then in detector
        order (what feeding the values one by one to every detector in turn would find), and each
        detector's ``estimation`` after every value. Nobody watching ``signal``: ``([], {})``. A
        non-finite value raises ``ValueError`` after every detector was fed the values before it.
        """
        detectors = self._by_signal.get(signal)
        if not detectors:
            return [], {}
        if len(indices) != len(values):
            raise ValueError(f"{len(values)} {signal} values but {len(indices)} example indices")
        xs = [float(v) for v in values]
        if not all(map(math.isfinite, xs)):
            bad = next(j for j, x in enumerate(xs) if not math.isfinite(x))
            self.observe_many(signal, xs[:bad], indices=indices[:bad])
            raise ValueError(f"{signal} value {values[bad]!r} for example {indices[bad]} is not a finite number")
        found: list[tuple[int, int, DriftFinding]] = []
        estimates: dict[str, list[float]] = {}
        for order, det in enumerate(detectors):
            alarms, estimates[det.name] = _feed(det, xs)
            found.extend((j, order, DriftFinding(det.name, signal, kind, xs[j], indices[j])) for j, kind in alarms)
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
            checked = check_format(state, "drift monitor")
        except IncompatibleStateError as exc:
            return {name: str(exc) for name in self._detectors}
        saved = convert(checked, MonitorState, "drift monitor").detectors
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


def _feed(det: Detector, xs: list[float]) -> tuple[list[tuple[int, Alarm]], list[float]]:
    """``det.update_many(xs)``, or what it would return, for a detector without one."""
    # getattr, not isinstance: a runtime Protocol check walks the protocol's attributes on every
    # call (it was 4% of the learner's time).
    many = getattr(det, "update_many", None)
    if many is not None:
        batch: tuple[list[tuple[int, Alarm]], list[float]] = many(xs)
        return batch
    alarms: list[tuple[int, Alarm]] = []
    estimates: list[float] = []
    for j, x in enumerate(xs):
        signal = det.update(x)
        if signal is not Signal.NONE:
            alarms.append((j, signal))
        estimates.append(det.estimation)
    return alarms, estimates
