"""Drift detectors, their pickle-free state, the monitor, the policy and drift events (unit tests: no servers).

Streams are seeded, so every number below is reproducible. Each detector case
runs through one suite (River style): it detects an abrupt change in time,
stays quiet on a stationary stream, and resumes exactly from JSON state.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from river import drift as river_drift
from river.datasets import synth

from stream_learner import events
from stream_learner.config import Settings
from stream_learner.drift import (
    ADWIN,
    ADWINDetector,
    Alert,
    Checkpoint,
    Detector,
    DriftFinding,
    DriftMonitor,
    DriftPolicy,
    DriftStateError,
    DriftWatch,
    IncompatibleStateError,
    LrBoost,
    OptimizerReset,
    PageHinkleyDetector,
    PromoteChallengerIfBetter,
    Signal,
    StartChallenger,
    drift_event,
    drift_event_id,
    from_settings,
)

ROOT = Path(__file__).resolve().parents[1]
N = 4000
CHANGE = 2000
SEEDS = range(5)


# --------------------------------------------------------------------------- synthetic signals

Sampler = Callable[[random.Random, bool], float]


def error(rng: random.Random, shifted: bool) -> float:
    """0/1 prequential error: the error rate goes from 10% to 50%."""
    return float(rng.random() < (0.5 if shifted else 0.1))


def loss(rng: random.Random, shifted: bool) -> float:
    """Per-example loss, exponential: its mean goes from 0.3 to 0.8."""
    return rng.expovariate(1 / (0.8 if shifted else 0.3))


def confidence(rng: random.Random, shifted: bool) -> float:
    """Max class probability, Beta: its mean goes from 0.8 to 0.625 (inputs moved away from the training data)."""
    return rng.betavariate(5, 3) if shifted else rng.betavariate(8, 2)


def feature(rng: random.Random, shifted: bool) -> float:
    """A standardized feature whose mean moves by half a standard deviation."""
    return rng.gauss(0.5 if shifted else 0.0, 1.0)


def stream(sample: Sampler, seed: int, n: int = N, changes: tuple[int, ...] = (CHANGE,)) -> list[float]:
    """``n`` values of ``sample``, switching between the base and the shifted regime at each change."""
    rng = random.Random(seed)
    shifted, out = False, []
    for i in range(n):
        if i in changes:
            shifted = not shifted
        out.append(sample(rng, shifted))
    return out


@dataclass(frozen=True)
class Case:
    make: Callable[[], Detector]
    sample: Sampler
    max_delay: int


CASES = {
    "adwin-error": Case(lambda: ADWINDetector("error"), error, 200),
    "adwin-error-no-warning": Case(lambda: ADWINDetector("error", warning_delta=None), error, 200),
    "page-hinkley-loss": Case(lambda: PageHinkleyDetector("loss"), loss, 300),
    "page-hinkley-loss-warning": Case(lambda: PageHinkleyDetector("loss", warning_threshold=25.0), loss, 300),
    "adwin-confidence": Case(lambda: ADWINDetector("confidence"), confidence, 300),
    "adwin-feature": Case(lambda: ADWINDetector("feature:tenure_months"), feature, 500),
}
case_params = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def signals_of(det: Detector, values: list[float]) -> list[Signal]:
    return [det.update(x) for x in values]


def first(signals: list[Signal], kind: Signal, start: int = 0) -> int | None:
    return next((i for i, s in enumerate(signals) if s is kind and i >= start), None)


# --------------------------------------------------------------------------- every detector


@case_params
@pytest.mark.parametrize("seed", SEEDS)
def test_detects_an_abrupt_change_in_time(case: Case, seed: int) -> None:
    signals = signals_of(case.make(), stream(case.sample, seed))
    assert first(signals, Signal.DRIFT) is not None, "missed the change"
    detected = first(signals, Signal.DRIFT)
    assert CHANGE <= detected <= CHANGE + case.max_delay, f"drift at {detected}, change at {CHANGE}"


@case_params
@pytest.mark.parametrize("seed", SEEDS)
def test_stays_quiet_on_a_stationary_stream(case: Case, seed: int) -> None:
    signals = signals_of(case.make(), stream(case.sample, 100 + seed, changes=()))
    assert [(i, s) for i, s in enumerate(signals) if s is not Signal.NONE] == []


@case_params
def test_state_round_trips_through_json_and_resumes_identically(case: Case) -> None:
    # Changes in both halves, so the resumed half also sees drifts (and the resets after them).
    values = stream(case.sample, 7, n=10_000, changes=(2500, 6000, 8000))
    original = case.make()
    signals_of(original, values[:5000])

    saved = json.dumps(original.state(), allow_nan=False)  # strict JSON: no NaN/Infinity tokens, no bytes
    resumed = case.make()
    resumed.restore(json.loads(saved))
    assert resumed.state() == original.state()

    after = []
    for i, x in enumerate(values[5000:]):
        a, b = original.update(x), resumed.update(x)
        assert a is b, f"signals differ {i} values after the restore"
        assert original.estimation == resumed.estimation  # type: ignore[attr-defined]
        if i % 50 == 0:
            assert original.state() == resumed.state()
        after.append(a)
    assert original.state() == resumed.state()
    assert Signal.DRIFT in after, "the resumed half should exercise a drift"


@case_params
def test_state_saved_on_the_drift_example_resumes_with_the_pending_reset(case: Case) -> None:
    # River detectors drop their window on the update *after* a drift: a snapshot taken right then must keep that.
    values = stream(case.sample, 3, n=6000)
    probe = signals_of(case.make(), values)
    cut = first(probe, Signal.DRIFT)
    assert cut is not None
    original = case.make()
    signals_of(original, values[: cut + 1])
    resumed = case.make()
    resumed.restore(json.loads(json.dumps(original.state())))
    assert signals_of(original, values[cut + 1 :]) == signals_of(resumed, values[cut + 1 :])
    assert original.state() == resumed.state()


@case_params
def test_non_finite_values_are_refused(case: Case) -> None:
    det = case.make()
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="not a finite number"):
            det.update(bad)
    assert det.state() == case.make().state()


@case_params
def test_detectors_implement_the_protocol(case: Case) -> None:
    det = case.make()
    assert isinstance(det, Detector)
    assert det.signal in ("error", "loss", "confidence") or det.signal.startswith("feature:")


# --------------------------------------------------------------------------- error detector specifics


def test_error_detector_on_a_real_concept_drift() -> None:
    # A deployed model that learned SEA concept 0 (x0 + x1 > 8) meets concept 3 (threshold 9.5) from 2000 on.
    # ConceptDriftStream overflows math.exp when width is tiny next to position: width >= position / 100.
    data = synth.ConceptDriftStream(
        stream=synth.SEA(variant=0, noise=0.1, seed=1),
        drift_stream=synth.SEA(variant=3, noise=0.1, seed=2),
        position=CHANGE,
        width=CHANGE // 100,
        seed=3,
    )
    det = ADWINDetector("error")
    signals = [det.update((x[0] + x[1] > 8) != y) for x, y in itertools.islice(data, N)]
    detected = first(signals, Signal.DRIFT)
    assert detected is not None and CHANGE <= detected <= CHANGE + 1000
    assert 0.15 < det.estimation < 0.3  # the window kept after the cut sees the new error rate (~0.2)


def test_error_detector_warns_before_a_moderate_drift() -> None:
    warned_first = 0
    for seed in range(10):
        signals = signals_of(
            ADWINDetector("error"), stream(lambda r, s: float(r.random() < (0.2 if s else 0.1)), seed, n=8000)
        )
        warning, drift = first(signals, Signal.WARNING, CHANGE), first(signals, Signal.DRIFT, CHANGE)
        assert drift is not None
        warned_first += warning is not None and warning < drift
    assert warned_first >= 8


def test_without_warning_delta_there_are_no_warnings() -> None:
    values = stream(lambda r, s: float(r.random() < (0.2 if s else 0.1)), 0, n=8000)
    assert Signal.WARNING not in signals_of(ADWINDetector("error", warning_delta=None), values)


# --------------------------------------------------------------------------- the ADWIN port


ADWIN_PARAMS = [
    {},
    {"delta": 0.05, "clock": 1},
    {"delta": 0.2, "clock": 7, "max_buckets": 2, "min_window_length": 1, "grace_period": 0},
    {"delta": 1e-5, "clock": 16, "max_buckets": 9, "min_window_length": 20, "grace_period": 100},
]


@pytest.mark.slow
@pytest.mark.parametrize("params", ADWIN_PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "defaults")
@pytest.mark.parametrize("sample", [error, loss, feature], ids=lambda f: f.__name__)
def test_adwin_port_matches_rivers_signals_and_estimates_bit_for_bit(params: dict[str, Any], sample: Sampler) -> None:
    values = stream(sample, 11, n=20_000, changes=(3000, 8000, 9000, 15000))
    ours, rivers = ADWIN(**params), river_drift.ADWIN(**params)
    detections = 0
    for i, x in enumerate(values):
        ours.update(x)
        rivers.update(x)
        assert ours.drift_detected == rivers.drift_detected, f"step {i}"
        assert (ours.width, ours.total, ours.variance, ours.estimation) == (
            rivers.width,
            rivers.total,
            rivers.variance,
            rivers.estimation,
        ), f"step {i}"
        detections += ours.drift_detected
    assert detections >= 3


def test_adwin_refuses_parameters_that_break_its_arithmetic() -> None:
    for bad in ({"delta": 0.0}, {"delta": 1.5}, {"clock": 0}, {"clock": 2.5}, {"min_window_length": 0}):
        with pytest.raises(ValueError):
            ADWIN(**bad)


# --------------------------------------------------------------------------- typed state


def test_state_is_plain_json_of_explicit_fields() -> None:
    det = ADWINDetector("error")
    signals_of(det, stream(error, 2, n=300))
    state = det.state()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    assert set(state) == {"format", "kind", "signal", "params", "drift", "warning"}
    assert (state["format"], state["kind"], state["signal"]) == (2, "adwin", "error")
    assert set(state["drift"]) == {"drift_detected", "tick", "width", "total", "variance", "totals", "variances"}
    assert state["drift"]["width"] == 300.0 and state["drift"]["tick"] == 300
    ph = PageHinkleyDetector("loss")
    assert ph.state()["drift"]["min_increase"] is None  # +inf before the first value; JSON has no infinity
    signals_of(ph, [0.3, 0.5])
    assert isinstance(ph.state()["drift"]["min_increase"], float)


def _set(state: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``state`` with the item at ``path`` ("drift.totals.0") replaced (or, for DELETE, removed)."""
    out = copy.deepcopy(state)
    *parents, last = path.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return out


DELETE = object()
ADWIN_MALFORMED = {
    "code-as-data": ("drift.totals", {"$obj": "os.system", "params": {}, "attrs": {}}),
    "unknown-field": ("drift.__reduce__", "os.system"),
    "missing-field": ("drift.variance", DELETE),
    "string-number": ("drift.total", "12.0"),
    "bool-number": ("drift.width", True),
    "nan": ("drift.total", math.nan),
    "infinity": ("warning.variances.0.0", math.inf),
    "negative-tick": ("drift.tick", -1),
    "width-not-the-buckets": ("drift.width", 1234.0),
    "rows-differ": ("drift.variances", [[0.0]]),
    "row-over-max-buckets": (
        "drift",
        {
            "drift_detected": False,
            "tick": 6,
            "width": 6.0,
            "total": 6.0,
            "variance": 0.0,
            "totals": [[1.0] * 6],
            "variances": [[0.0] * 6],
        },
    ),
    "too-many-rows": ("drift.totals", [[]] * 65),
    "no-rows": ("drift.totals", []),
    "warning-missing": ("warning", None),
    "unknown-param": ("params.deltaa", 0.1),
    "not-an-object": ("drift", [1, 2]),
    "no-kind": ("kind", DELETE),
}
PH_MALFORMED = {
    "bad-mode": ("params.mode", "sideways"),
    "negative-count": ("drift.n", -1.0),
    "infinite-mean": ("drift.mean", math.inf),
    "nan-min": ("drift.min_increase", math.nan),
    "extra-warning": (
        "warning",
        {
            "drift_detected": False,
            "n": 0.0,
            "mean": 0.0,
            "sum_increase": 0.0,
            "sum_decrease": 0.0,
            "min_increase": None,
            "max_decrease": -1.0,
        },
    ),
}


@pytest.mark.parametrize(
    "make, path, value",
    [
        *[pytest.param(lambda: ADWINDetector("error"), p, v, id=f"adwin-{k}") for k, (p, v) in ADWIN_MALFORMED.items()],
        *[pytest.param(lambda: PageHinkleyDetector("loss"), p, v, id=f"ph-{k}") for k, (p, v) in PH_MALFORMED.items()],
    ],
)
def test_restore_refuses_malformed_or_hostile_state_and_changes_nothing(
    make: Callable[[], Detector], path: str, value: Any
) -> None:
    saved = make()
    signals_of(saved, stream(error, 3, n=1000))
    det = make()
    before = det.state()
    with pytest.raises(DriftStateError) as raised:
        det.restore(_set(saved.state(), path, value))
    assert not isinstance(raised.value, IncompatibleStateError)  # malformed is not "start fresh"
    assert det.state() == before


@pytest.mark.parametrize(
    "state",
    [[], "state", None, {"format": True}, {"format": "2"}, {"format": 99}],
    ids=["list", "str", "null", "bool-format", "str-format", "future-format"],
)
def test_restore_refuses_what_is_not_a_state(state: Any) -> None:
    with pytest.raises(DriftStateError):
        ADWINDetector("error").restore(state)
    with pytest.raises(DriftStateError):
        DriftMonitor.default().restore(state)


# The default monitor's state as version 1 wrote it (its type-tagged walker), one detector shown.
OLD_MONITOR_STATE = {
    "format": 1,
    "detectors": {
        "adwin_error": {
            "format": 1,
            "kind": "adwin",
            "signal": "error",
            "params": {
                "delta": 0.002,
                "warning_delta": 0.02,
                "clock": 32,
                "max_buckets": 5,
                "min_window_length": 5,
                "grace_period": 10,
            },
            "drift": {
                "$obj": "stream_learner.drift.ADWIN",
                "params": {"delta": 0.002, "clock": 32, "max_buckets": 5, "min_window_length": 5, "grace_period": 10},
                "attrs": {
                    "_drift_detected": False,
                    "_total": 1.0,
                    "_variance": 0.0,
                    "_width": 1.0,
                    "_tick": 1,
                    "_totals": [[1.0]],
                    "_variances": [[0.0]],
                },
            },
            "warning": None,
        }
    },
}


def test_state_of_an_unknown_kind_starts_the_detector_fresh() -> None:
    state = ADWINDetector("error").state()
    with pytest.raises(IncompatibleStateError, match="kind 'kswin'"):
        ADWINDetector("error").restore({**state, "kind": "kswin"})


def test_state_of_an_older_version_starts_fresh_with_the_reason() -> None:
    monitor = DriftMonitor.default()
    before = monitor.state()
    fresh = monitor.restore(copy.deepcopy(OLD_MONITOR_STATE))
    assert set(fresh) == set(monitor.detectors)
    assert all("format 1" in reason for reason in fresh.values())
    assert monitor.state() == before
    # A detector's own old state is incompatible too (start fresh), not malformed.
    with pytest.raises(IncompatibleStateError, match="format 1"):
        ADWINDetector("error").restore(OLD_MONITOR_STATE["detectors"]["adwin_error"])
    # Inside a current monitor state, an old detector state starts that detector fresh.
    current = monitor.state()
    current["detectors"]["adwin_error"] = OLD_MONITOR_STATE["detectors"]["adwin_error"]
    assert set(DriftMonitor.default().restore(current)) == {"adwin_error"}


def test_restore_refuses_state_of_other_parameters_or_kinds_and_changes_nothing() -> None:
    det = ADWINDetector("error")
    signals_of(det, stream(error, 1))
    before = det.state()
    with pytest.raises(IncompatibleStateError, match="params"):
        det.restore(ADWINDetector("error", delta=0.01).state())
    with pytest.raises(IncompatibleStateError, match="kind"):
        det.restore(PageHinkleyDetector("error").state())
    with pytest.raises(IncompatibleStateError, match="signal"):
        det.restore(ADWINDetector("confidence").state())
    corrupted = json.loads(json.dumps(before))
    corrupted["drift"]["$obj"] = "os.system"
    with pytest.raises(DriftStateError):
        det.restore(corrupted)
    with pytest.raises(DriftStateError):
        det.restore({"format": 99})
    assert det.state() == before


# --------------------------------------------------------------------------- the monitor


def feed(monitor: DriftMonitor, seed: int, start: int, stop: int) -> list[DriftFinding]:
    """Every signal of examples start..stop-1; the concept changes at 2500 and 6000."""
    rng = random.Random(seed)
    findings = []
    for i in range(stop):
        shifted = 2500 <= i < 6000
        values = {"error": error(rng, shifted), "loss": loss(rng, shifted), "confidence": confidence(rng, shifted)}
        if i >= start:
            for signal, value in values.items():
                findings += monitor.observe(signal, value, index=i)
    return findings


def test_default_monitor_watches_error_loss_and_confidence() -> None:
    monitor = DriftMonitor.default()
    assert {n: d.signal for n, d in monitor.detectors.items()} == {
        "adwin_error": "error",
        "page_hinkley_loss": "loss",
        "adwin_confidence": "confidence",
    }
    assert monitor.signals == {"error", "loss", "confidence"}


def test_monitor_routes_each_signal_to_its_detectors_and_reports_findings() -> None:
    monitor = DriftMonitor(
        [
            ADWINDetector("error"),
            PageHinkleyDetector("error", name="ph_error", delta=0.05, threshold=20.0),
            ADWINDetector("confidence"),
        ]
    )
    findings = []
    for i, x in enumerate(stream(error, 0)):
        findings += monitor.observe("error", x, index=i)
    assert {f.detector for f in findings} == {"adwin_error", "ph_error"}  # confidence was never fed
    assert {(f.detector, f.kind) for f in findings} >= {("adwin_error", Signal.DRIFT), ("ph_error", Signal.DRIFT)}
    assert all(f.signal == "error" and f.value in (0.0, 1.0) and CHANGE <= f.index <= CHANGE + 300 for f in findings)
    assert monitor.observe("feature:age", 3.0, index=N) == []  # nobody watches it
    with pytest.raises(ValueError, match="not a finite number"):
        monitor.observe("error", math.nan, index=N)


class Threshold:
    """A detector of the protocol's minimum: update, state, restore (no update_many)."""

    name, signal, estimation = "too_unsure", "confidence", 0.5

    def update(self, value: float) -> Signal:
        return Signal.DRIFT if value < 0.2 else Signal.NONE

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass


def test_monitor_accepts_any_detector_implementing_the_protocol() -> None:
    monitor = DriftMonitor([Threshold()])
    assert monitor.observe("confidence", 0.1, index=9) == [
        DriftFinding("too_unsure", "confidence", Signal.DRIFT, 0.1, 9)
    ]
    with pytest.raises(TypeError):
        DriftMonitor([object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="two detectors"):
        DriftMonitor([ADWINDetector("error"), ADWINDetector("error")])


@pytest.mark.slow
def test_monitor_state_round_trips_and_resumes_identically() -> None:
    original = DriftMonitor.default()
    feed(original, 4, 0, 5000)
    resumed = DriftMonitor.default()
    assert resumed.restore(json.loads(json.dumps(original.state(), allow_nan=False))) == {}
    assert resumed.state() == original.state()
    later_original = feed(original, 4, 5000, 9000)
    assert later_original, "the second half has a drift back at 6000"
    assert feed(resumed, 4, 5000, 9000) == later_original
    assert resumed.state() == original.state()


def test_monitor_restore_after_a_config_change_starts_changed_detectors_fresh() -> None:
    old = DriftMonitor.default()
    feed(old, 5, 0, 3000)
    saved = json.loads(json.dumps(old.state()))
    new = DriftMonitor(
        [
            ADWINDetector("error", delta=0.001),  # retuned
            ADWINDetector("confidence"),  # unchanged
            ADWINDetector("feature:plan", name="adwin_plan"),  # new
        ]
    )  # loss: dropped
    fresh = new.restore(saved)
    assert set(fresh) == {"adwin_error", "adwin_plan"}
    assert "params" in fresh["adwin_error"] and fresh["adwin_plan"] == "no saved state"
    assert new.detectors["adwin_confidence"].state() == saved["detectors"]["adwin_confidence"]
    assert new.detectors["adwin_error"].state() == ADWINDetector("error", delta=0.001).state()
    # The restored detector is the one the monitor feeds.
    new.observe("confidence", 0.5, index=3000)
    assert new.detectors["adwin_confidence"].state() != saved["detectors"]["adwin_confidence"]


def test_monitor_restore_of_a_malformed_state_changes_nothing() -> None:
    old = DriftMonitor.default()
    feed(old, 6, 0, 3000)
    saved = json.loads(json.dumps(old.state()))
    saved["detectors"]["adwin_confidence"]["drift"]["totals"] = {"$obj": "os.system", "params": {}, "attrs": {}}
    monitor = DriftMonitor.default()
    before = monitor.state()
    with pytest.raises(DriftStateError):
        monitor.restore(saved)
    assert monitor.state() == before  # adwin_error, restored before the failure, was not swapped in
    with pytest.raises(DriftStateError):
        monitor.restore({"detectors": {}})


# --------------------------------------------------------------------------- from the settings


def test_from_settings_builds_the_default_detectors_and_the_configured_policy() -> None:
    settings = Settings(
        trainer_drift_challenger_on_warning=True,
        trainer_drift_on_drift=["checkpoint", "lr_boost"],
        trainer_drift_lr_boost_factor=4.0,
        trainer_drift_lr_boost_batches=30,
    )
    monitor, policy = from_settings(settings)
    assert monitor is not None and monitor.state() == DriftMonitor.default().state()
    assert policy == DriftPolicy(
        challenger_on_warning=True, on_drift=("checkpoint", "lr_boost"), lr_boost_factor=4.0, lr_boost_steps=30
    )
    assert from_settings(msgspec.structs.replace(settings, trainer_drift_enabled=False)) == (None, policy)


def test_policy_defaults_are_the_settings_defaults() -> None:
    defaults = Settings()
    assert DriftPolicy() == from_settings(defaults)[1]
    assert (
        DriftPolicy().challenger_on_warning,
        DriftPolicy().on_drift,
        DriftPolicy().lr_boost_factor,
        DriftPolicy().lr_boost_steps,
    ) == (
        defaults.trainer_drift_challenger_on_warning,
        tuple(defaults.trainer_drift_on_drift),
        defaults.trainer_drift_lr_boost_factor,
        defaults.trainer_drift_lr_boost_batches,
    )


# --------------------------------------------------------------------------- the policy


def finding(kind: Signal, index: int = 2047) -> DriftFinding:
    return DriftFinding("adwin_error", "error", kind, 1.0, index)


WARNING, DRIFT = finding(Signal.WARNING), finding(Signal.DRIFT)


def test_warning_starts_a_challenger_only_when_enabled_and_none_runs() -> None:
    assert DriftPolicy().decide(WARNING) == [Alert()]
    enabled = DriftPolicy(challenger_on_warning=True)
    assert enabled.decide(WARNING) == [Alert(), StartChallenger()]
    assert enabled.decide(WARNING, challenger_active=True) == [Alert()]
    # A drift never starts one: it acts now.
    assert StartChallenger() not in enabled.decide(DRIFT)


@pytest.mark.parametrize(
    "option, active, expected",
    [
        ("lr_boost", False, [LrBoost(factor=3.0, steps=250)]),
        ("optimizer_reset", False, [OptimizerReset()]),
        ("checkpoint", False, [Checkpoint()]),
        ("promote_challenger_if_better", False, []),
        ("promote_challenger_if_better", True, [PromoteChallengerIfBetter()]),
    ],
)
def test_each_drift_option_produces_its_action(option: str, active: bool, expected: list[Any]) -> None:
    policy = DriftPolicy(on_drift=[option], lr_boost_factor=3.0, lr_boost_steps=250)
    assert policy.decide(DRIFT, challenger_active=active) == [Alert(), *expected]


def test_drift_actions_come_in_execution_order_whatever_the_config_order() -> None:
    options = ["checkpoint", "lr_boost", "optimizer_reset", "promote_challenger_if_better"]
    for order in itertools.permutations(options):
        assert [a.kind for a in DriftPolicy(on_drift=order).decide(DRIFT, challenger_active=True)] == [
            "alert",
            "promote_challenger_if_better",
            "optimizer_reset",
            "lr_boost",
            "checkpoint",
        ]
    assert DriftPolicy(on_drift=()).decide(DRIFT) == [Alert()]  # the alert is always there
    assert [a.kind for a in DriftPolicy().decide(DRIFT)] == ["alert", "lr_boost", "checkpoint"]


def test_policy_refuses_unknown_actions_and_weak_boosts() -> None:
    with pytest.raises(ValueError, match="unknown drift actions"):
        DriftPolicy(on_drift=["alert", "reboot"])
    with pytest.raises(ValueError):
        DriftPolicy(lr_boost_factor=1.0)
    with pytest.raises(ValueError):
        DriftPolicy(lr_boost_steps=0)


def test_actions_of_several_findings_merge() -> None:
    policy = DriftPolicy()
    actions = policy.decide(DRIFT) + policy.decide(finding(Signal.DRIFT, 2047))
    assert list(dict.fromkeys(actions)) == policy.decide(DRIFT)


# --------------------------------------------------------------------------- drift events


DRIFT_SCHEMA = jsonschema.Draft202012Validator(json.loads((ROOT / "schemas" / "drift.v1.json").read_text()))


def test_drift_event_is_valid_and_its_id_is_the_same_on_a_replay() -> None:
    actions = DriftPolicy(lr_boost_factor=3.0, lr_boost_steps=250).decide(DRIFT)
    event = drift_event(DRIFT, actions, model="churn", event_time=1_767_225_600_000, model_version=12)
    replayed = drift_event(
        finding(Signal.DRIFT), actions, model="churn", event_time=1_767_225_600_000, model_version=12
    )
    assert event == replayed
    assert event.event_id == drift_event_id("churn", "adwin_error", 2047)
    assert (event.kind, event.detector, event.signal, event.value, event.actions) == (
        "drift",
        "adwin_error",
        "error",
        1.0,
        ["alert", "lr_boost", "checkpoint"],
    )
    assert event.details == {"index": 2047, "lr_boost_factor": 3.0, "lr_boost_steps": 250}
    wire = events.encode(event)
    DRIFT_SCHEMA.validate(json.loads(wire))
    assert events.DRIFT.decode(wire) == event


def test_drift_event_ids_differ_by_model_detector_and_example() -> None:
    ids = {drift_event_id(m, d, i) for m, d, i in itertools.product(["churn", "fraud"], ["a", "b"], [1, 2])}
    assert len(ids) == 8
    assert drift_event_id("a:b", "c", 1) != drift_event_id("a", "b:c", 1)


def test_warning_event() -> None:
    event = drift_event(WARNING, DriftPolicy(challenger_on_warning=True).decide(WARNING), model="churn", event_time=1)
    assert (event.kind, event.actions) == ("warning", ["alert", "start_challenger"])
    DRIFT_SCHEMA.validate(json.loads(events.encode(event)))


def test_default_detectors_are_the_documented_ones() -> None:
    assert [(name, type(d).__name__, d.signal) for name, d in DriftMonitor.default().detectors.items()] == [
        ("adwin_error", "ADWINDetector", "error"),
        ("page_hinkley_loss", "PageHinkleyDetector", "loss"),
        ("adwin_confidence", "ADWINDetector", "confidence"),
    ]
    assert DriftPolicy().on_drift == ("promote_challenger_if_better", "lr_boost", "checkpoint")


# --------------------------------------------------------------------------- batched updates


def random_batches(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into batches of random sizes (1 to 700, clock ticks fall anywhere in them)."""
    out, i = [], 0
    while i < n:
        k = rng.choice([1, 2, 5, 31, 32, 33, 64, 256, 700])
        out.append((i, min(n, i + k)))
        i += k
    return out


@pytest.mark.slow
@pytest.mark.parametrize("params", ADWIN_PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "defaults")
@pytest.mark.parametrize("sample", [error, loss, confidence, feature], ids=lambda f: f.__name__)
def test_adwin_update_many_is_update_one_by_one(params: dict[str, Any], sample: Sampler) -> None:
    values = stream(sample, 5, n=12_000, changes=(2000, 5000, 5500, 9000))
    one, many = ADWIN(**params), ADWIN(**params)
    detected, estimates, got_detected, got_estimates = [], [], [], []
    for a, b in random_batches(random.Random(3), len(values)):
        for i in range(a, b):
            one.update(values[i])
            if one.drift_detected:
                detected.append(i)
            estimates.append(one.estimation)
        got_detected += [a + j for j in many.update_many(values[a:b], got_estimates)]
        # Between batches, the state is the state after the same values one by one.
        assert many.window() == one.window(), f"after {b} values"
    assert got_detected == detected and len(detected) >= 2
    assert got_estimates == estimates  # exact floats, not approximately


@case_params
@pytest.mark.parametrize("seed", range(20))
def test_detector_update_many_is_update_one_by_one(case: Case, seed: int) -> None:
    rng = random.Random(seed)
    changes = tuple(sorted(rng.sample(range(500, 7500), 3)))
    values = stream(case.sample, seed, n=8000, changes=changes)
    one, many = case.make(), case.make()
    expected, got = [], []
    for a, b in random_batches(rng, len(values)):
        want_estimates = []
        for i in range(a, b):
            if (s := one.update(values[i])) is not Signal.NONE:
                expected.append((i, s))
            want_estimates.append(one.estimation)
        signals, estimates = many.update_many(values[a:b])
        got += [(a + j, s) for j, s in signals]
        assert estimates == want_estimates
        assert json.dumps(many.state()) == json.dumps(one.state()), f"after {b} values"
    assert got == expected and expected


@pytest.mark.parametrize("mode", ["up", "down", "both"])
@pytest.mark.parametrize("alpha", [1.0, 0.999])
def test_page_hinkley_many_is_rivers_update_one_by_one(mode: str, alpha: float) -> None:
    # The batched port against River's own PageHinkley.update: positions, means and sums, bit for bit.
    from stream_learner.drift.detectors import page_hinkley_many
    from stream_learner.drift.state import save_page_hinkley

    rng = random.Random(11)
    values = stream(loss, 4, n=6000, changes=(1500, 3000, 4500))
    values = [v if i < 3000 else 1.0 - min(v, 1.0) for i, v in enumerate(values)]  # a fall too, for "down"
    one = river_drift.PageHinkley(min_instances=30, delta=0.05, threshold=20.0, alpha=alpha, mode=mode)
    many = copy.deepcopy(one)
    detected, means, got, got_means = [], [], [], []
    for a, b in random_batches(rng, len(values)):
        for i in range(a, b):
            one.update(values[i])
            if one.drift_detected:
                detected.append(i)
            means.append(one._x_mean.get())
        got += [a + j for j in page_hinkley_many(many, values[a:b], got_means)]
        assert save_page_hinkley(many) == save_page_hinkley(one), f"after {b} values"
    assert got == detected and detected
    assert got_means == means


@pytest.mark.slow
def test_monitor_observe_many_is_observe_one_by_one() -> None:
    # Two detectors on one signal: findings come by position, then in detector order.
    def make() -> DriftMonitor:
        return DriftMonitor(
            [
                ADWINDetector("error"),
                PageHinkleyDetector("error", name="ph_error", delta=0.05, threshold=20.0),
                ADWINDetector("confidence"),
            ]
        )

    rng = random.Random(9)
    for seed in range(10):
        values = {
            "error": stream(error, seed, n=6000, changes=(1500, 3000, 4500)),
            "confidence": stream(confidence, seed, n=6000, changes=(2500,)),
        }
        one, many = make(), make()
        expected, got = [], []
        for a, b in random_batches(rng, 6000):
            for signal in ("confidence", "error"):
                for i in range(a, b):
                    expected += one.observe(signal, values[signal][i], index=10 * i)
                findings, estimates = many.observe_many(
                    signal, values[signal][a:b], indices=[10 * i for i in range(a, b)]
                )
                got += [f for _, f in findings]
                assert [f.index for _, f in findings] == [10 * (a + j) for j, _ in findings]
                for det in many.detectors.values():
                    if det.signal == signal:
                        assert estimates[det.name][-1] == det.estimation
        assert got == expected and len(expected) >= 3
        assert json.dumps(many.state()) == json.dumps(one.state())


def test_observe_many_feeds_the_values_before_a_non_finite_one_then_raises() -> None:
    one, many = DriftMonitor.default(), DriftMonitor.default()
    values = stream(error, 1, n=100)
    for i, x in enumerate(values[:70]):
        one.observe("error", x, index=i)
    with pytest.raises(ValueError, match="not a finite number"):
        many.observe_many("error", values[:70] + [math.inf] + values[71:], indices=list(range(100)))
    assert json.dumps(many.state()) == json.dumps(one.state())


def test_the_monitor_is_what_the_learner_needs() -> None:
    monitor = DriftMonitor.default()
    assert isinstance(monitor, DriftWatch)
    with pytest.raises(ValueError, match="3 error values but 2 example indices"):
        monitor.observe_many("error", [0.0, 1.0, 0.0], indices=[1, 2])
    assert monitor.state() == DriftMonitor.default().state()


def test_observe_many_with_a_detector_without_update_many() -> None:
    findings, estimates = DriftMonitor([Threshold()]).observe_many("confidence", [0.9, 0.1, 0.5], indices=[7, 8, 9])
    assert findings == [(1, DriftFinding("too_unsure", "confidence", Signal.DRIFT, 0.1, 8))]
    assert estimates == {"too_unsure": [0.5, 0.5, 0.5]}
