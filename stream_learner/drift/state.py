"""Detector and monitor state as typed msgspec structs: plain JSON out, validated on the way in.

The learner keeps :meth:`DriftMonitor.state() <stream_learner.drift.DriftMonitor.state>`
in a snapshot's JSON meta and hands it back after a restart, so state is data
only: each detector kind has an explicit struct, ``state()`` returns
``msgspec.to_builtins`` of it and ``restore()`` rebuilds it with
``msgspec.convert``, which checks every field's type (no pickle, and nothing
in the state names a class or function). Whatever the types cannot say (finite
numbers, the shape of an ADWIN window) the detectors check before they take
the state, so a malformed or hostile state raises :class:`DriftStateError`
and changes nothing. (:class:`~stream_learner.drift.ADWIN` converts its own
window; River's ``PageHinkley`` is converted by the functions at the end.)

>>> import msgspec
>>> state = msgspec.to_builtins(PageHinkleyTest(drift_detected=False, n=0.0, mean=0.0, sum_increase=0.0,
...                                             sum_decrease=0.0, min_increase=None, max_decrease=-1.0))
>>> state["min_increase"] is None                          # +inf, which JSON cannot hold
True
>>> msgspec.convert({**state, "n": "3"}, PageHinkleyTest)
Traceback (most recent call last):
...
msgspec.ValidationError: Expected `float`, got `str` - at `$.n`
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct
from river import drift as river_drift
from river import stats as river_stats

from ..errors import StreamLearnerError

#: Version of the layout :meth:`Detector.state` and :meth:`DriftMonitor.state` write.
STATE_FORMAT = 2
#: Layouts of earlier versions (1: a generic type-tagged object walker). Their state is not
#: refused but dropped: the detectors start fresh and :meth:`DriftMonitor.restore` says why.
OLD_FORMATS = frozenset({1})

# ADWIN's width is a float count, exact below 2**53, so its window never needs more rows.
_MAX_ROWS = 64


class DriftStateError(StreamLearnerError):
    """Detector state cannot be restored: malformed, or not what the detector could have saved."""


class IncompatibleStateError(DriftStateError):
    """Saved detector state belongs to another detector kind, signal, parameters or state format."""


class _State(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the state structs: immutable, every field required, unknown fields refused."""


class ADWINWindow(_State, frozen=True):
    """One :class:`~stream_learner.drift.ADWIN`'s running state.

    Row ``i`` of ``totals`` and ``variances`` holds the summaries of the
    window's buckets of ``2**i`` values, oldest first; ``width``, ``total`` and
    ``variance`` are the running count, sum and sum of squared deviations of
    the whole window; ``drift_detected`` is the pending reset of the update
    after a detection.
    """

    drift_detected: bool
    tick: Annotated[int, Meta(ge=0)]
    width: float
    total: float
    variance: float
    totals: Annotated[list[list[float]], Meta(min_length=1, max_length=_MAX_ROWS)]
    variances: Annotated[list[list[float]], Meta(min_length=1, max_length=_MAX_ROWS)]


class PageHinkleyTest(_State, frozen=True):
    """One River ``PageHinkley`` test's running state (its parameters are the detector's)."""

    drift_detected: bool
    n: Annotated[float, Meta(ge=0)]  # values since the last reset (River's running Mean's weight)
    mean: float
    sum_increase: float
    sum_decrease: float
    min_increase: float | None  # None: +inf, what it is before the first value
    max_decrease: float


class ADWINParams(_State, frozen=True):
    """The parameters of an :class:`~stream_learner.drift.ADWINDetector`."""

    delta: float
    warning_delta: float | None
    clock: int
    max_buckets: int
    min_window_length: int
    grace_period: int


class PageHinkleyParams(_State, frozen=True):
    """The parameters of a :class:`~stream_learner.drift.PageHinkleyDetector`."""

    min_instances: int
    delta: float
    threshold: float
    alpha: float
    mode: Literal["up", "down", "both"]
    warning_threshold: float | None


class DetectorState(_State, frozen=True, tag_field="kind"):
    """What every twin detector saves: state format, kind (the tag), signal and parameters."""

    format: int
    signal: str
    params: Struct  # each kind's own parameters struct


class ADWINDetectorState(DetectorState, frozen=True, tag="adwin"):
    """An :class:`~stream_learner.drift.ADWINDetector`: the drift ADWIN and its warning twin."""

    params: ADWINParams
    drift: ADWINWindow
    warning: ADWINWindow | None


class PageHinkleyDetectorState(DetectorState, frozen=True, tag="page_hinkley"):
    """A :class:`~stream_learner.drift.PageHinkleyDetector`: the drift test and its warning twin."""

    params: PageHinkleyParams
    drift: PageHinkleyTest
    warning: PageHinkleyTest | None


class MonitorState(_State, frozen=True):
    """A :class:`~stream_learner.drift.DriftMonitor`: each detector's own state, by name.

    The monitor accepts any detector of the protocol, so it leaves the
    detectors' states to the detectors to validate.
    """

    format: int
    detectors: dict[Annotated[str, Meta(min_length=1, max_length=256)], dict[str, Any]]


S = TypeVar("S", bound=DetectorState)
T = TypeVar("T", bound=Struct)


def check_format(state: object, what: str) -> Mapping[str, Any]:
    """``state``, if it is a JSON object of :data:`STATE_FORMAT`; an :data:`OLD_FORMATS` one is incompatible.

    >>> check_format({"format": 1}, "adwin_error")
    Traceback (most recent call last):
    ...
    stream_learner.drift.state.IncompatibleStateError: adwin_error: saved in state format 1, this version reads format 2
    """
    if not isinstance(state, Mapping):
        raise DriftStateError(f"{what}: saved state is a {type(state).__name__}, not an object")
    fmt = state.get("format")
    if type(fmt) is int and fmt in OLD_FORMATS:
        raise IncompatibleStateError(f"{what}: saved in state format {fmt}, this version reads format {STATE_FORMAT}")
    if type(fmt) is not int or fmt != STATE_FORMAT:
        raise DriftStateError(f"{what}: not a state of format {STATE_FORMAT} (format {fmt!r})")
    return state


def convert(state: Mapping[str, Any], cls: type[T], what: str) -> T:
    """``msgspec.convert`` into ``cls``, a :class:`DriftStateError` naming the bad field if it does not fit."""
    try:
        return msgspec.convert(dict(state), cls)
    except msgspec.ValidationError as exc:
        raise DriftStateError(f"{what}: malformed saved state: {exc}") from None


def load_detector_state(state: object, cls: type[S], *, name: str, signal: str, params: Struct) -> S:
    """The saved state of detector ``name`` as a ``cls``, if it was saved with this signal and parameters.

    Raises :class:`IncompatibleStateError` for state of an older format, or
    another kind, signal or parameters (it says nothing about this detector's
    stream), and :class:`DriftStateError` if it is malformed.
    """
    checked = check_format(state, name)
    kind, saved_kind = cls.__struct_config__.tag, checked.get("kind")
    if not isinstance(saved_kind, str):
        raise DriftStateError(f"{name}: saved state has no detector kind")
    if saved_kind != kind:  # e.g. a kind of a later version: start fresh
        raise IncompatibleStateError(f"{name}: saved kind {saved_kind!r}, configured {kind!r}")
    saved = convert(checked, cls, name)
    if saved.signal != signal:
        raise IncompatibleStateError(f"{name}: saved signal {saved.signal!r}, configured {signal!r}")
    if saved.params != params:
        raise IncompatibleStateError(
            f"{name}: saved params {msgspec.to_builtins(saved.params)}, configured {msgspec.to_builtins(params)}"
        )
    return saved


def require_finite(what: str, values: Iterable[float]) -> None:
    """Refuse NaN and infinities: one would poison a detector's running sums for good."""
    if not all(map(math.isfinite, values)):
        raise DriftStateError(f"{what}: saved state holds a non-finite number")


# River's PageHinkley is not ours to extend, so its conversion to and from its struct lives here.


def save_page_hinkley(test: river_drift.PageHinkley) -> PageHinkleyTest:
    """The running sums of a River ``PageHinkley`` (its parameters are the detector's)."""
    return PageHinkleyTest(
        drift_detected=test._drift_detected,
        n=test._x_mean.n,
        mean=test._x_mean._mean,
        sum_increase=test._sum_increase,
        sum_decrease=test._sum_decrease,
        min_increase=None if test._min_increase == math.inf else test._min_increase,
        # River starts it at the int -1; as a float it compares and subtracts the same.
        max_decrease=float(test._max_decrease),
    )


def restore_page_hinkley(test: river_drift.PageHinkley, saved: PageHinkleyTest, name: str) -> None:
    """Put saved sums into a fresh ``PageHinkley`` (whose constructor chose its test from ``mode``)."""
    numbers = [saved.n, saved.mean, saved.sum_increase, saved.sum_decrease, saved.max_decrease]
    require_finite(name, numbers if saved.min_increase is None else [*numbers, saved.min_increase])
    mean = river_stats.Mean()
    mean.n, mean._mean = saved.n, saved.mean
    test._drift_detected = saved.drift_detected
    test._x_mean = mean
    test._sum_increase, test._sum_decrease = saved.sum_increase, saved.sum_decrease
    test._min_increase = math.inf if saved.min_increase is None else saved.min_increase
    test._max_decrease = saved.max_decrease  # type: ignore[assignment]  # River infers int from its -1
