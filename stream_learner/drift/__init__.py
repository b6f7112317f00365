"""Drift detection for the trainer: detectors behind one small interface, the monitor, the policy, the event.

The learner feeds each signal of a chunk of examples to a
:class:`DriftMonitor` (through :meth:`~DriftMonitor.observe_many`): the 0/1
prequential ``error`` and the ``loss`` once a label is known, and the
label-free ``confidence`` (the max class probability of the prediction) and
``feature:<name>`` values at once, since labels lag or never come. Each
:class:`Detector` turns a stream of floats into a :class:`Signal`
(``none``, ``warning`` or ``drift``); the monitor turns those into findings
(:class:`DriftFinding`), :class:`DriftPolicy` turns a finding into typed
actions, and :func:`drift_event` into the ``drift.v1`` event the trainer
publishes (its id is a hash of model, detector and example index, so a replay
publishes the same ids). :func:`from_settings` builds monitor and policy from
the settings; what the learner needs of a monitor is the :class:`DriftWatch`
protocol.

Modules, by concept:

* :mod:`.adwin` -- :class:`ADWIN`, a pure-Python port of River's ADWIN, bit
  for bit (River's keeps its window in an opaque Rust blob; this one's is
  plain floats, so it can be saved).
* :mod:`.detectors` -- the :class:`Detector` protocol, :class:`Signal`, and
  the twin detectors: :class:`ADWINDetector` (error, confidence,
  standardized features; the warning comes from a second, more sensitive
  ADWIN) and :class:`PageHinkleyDetector` (River's Page-Hinkley, on the loss).
* :mod:`.state` -- detector and monitor state as explicit msgspec structs:
  plain JSON in the trainer's snapshot, validated on restore (no pickle).
* :mod:`.monitor` -- :class:`DriftMonitor`, :class:`DriftFinding`, :class:`DriftWatch`.
* :mod:`.policy` -- :class:`DriftPolicy` and its actions (:data:`Action`).
* :mod:`.event` -- :func:`drift_event`, :func:`drift_event_id`.

>>> import json, random
>>> from stream_learner.config import Settings
>>> monitor, policy = from_settings(Settings(trainer_drift_challenger_on_warning=True))
>>> rng = random.Random(7)                      # the model's error rate jumps from 10% to 50% at 2000
>>> errors = [float(rng.random() < (0.1 if i < 2000 else 0.5)) for i in range(4000)]
>>> findings, estimates = monitor.observe_many("error", errors, indices=list(range(4000)))
>>> [(f.detector, f.kind.value, f.index) for _, f in findings]
[('adwin_error', 'drift', 2047)]
>>> actions = policy.decide(findings[0][1])
>>> actions
[Alert(), LrBoost(factor=2.0, steps=100), Checkpoint()]
>>> event = drift_event(findings[0][1], actions, model="churn", event_time=1_767_225_600_000)
>>> event.event_id == drift_event_id("churn", "adwin_error", 2047)
True
>>> saved = json.dumps(monitor.state())         # plain JSON: no pickle, no code on restore
>>> restored = DriftMonitor.default()
>>> restored.restore(json.loads(saved))         # detectors that start fresh, and why
{}
"""

from __future__ import annotations

from ..config import Settings
from .adwin import ADWIN
from .detectors import ADWINDetector, BatchDetector, Detector, PageHinkleyDetector, Signal
from .event import drift_event, drift_event_id
from .monitor import DriftFinding, DriftMonitor, DriftWatch, WatchedDetector
from .policy import (
    Action,
    Alert,
    Checkpoint,
    DriftPolicy,
    LrBoost,
    OptimizerReset,
    PromoteChallengerIfBetter,
    StartChallenger,
)
from .state import DriftStateError, IncompatibleStateError

__all__ = [
    "ADWIN",
    "ADWINDetector",
    "Action",
    "Alert",
    "BatchDetector",
    "Checkpoint",
    "Detector",
    "DriftFinding",
    "DriftMonitor",
    "DriftPolicy",
    "DriftStateError",
    "DriftWatch",
    "IncompatibleStateError",
    "LrBoost",
    "OptimizerReset",
    "PageHinkleyDetector",
    "PromoteChallengerIfBetter",
    "Signal",
    "StartChallenger",
    "WatchedDetector",
    "drift_event",
    "drift_event_id",
    "from_settings",
]


def from_settings(settings: Settings) -> tuple[DriftMonitor | None, DriftPolicy]:
    """The trainer's drift detection: the default detectors (``None`` if
    ``trainer_drift_enabled`` is off) and the policy of the ``trainer_drift_*`` settings.

    >>> from stream_learner.config import Settings
    >>> monitor, policy = from_settings(Settings())
    >>> list(monitor.detectors), policy == DriftPolicy()
    (['adwin_error', 'page_hinkley_loss', 'adwin_confidence'], True)
    >>> from_settings(Settings(trainer_drift_enabled=False, trainer_drift_lr_boost_batches=7))
    (None, DriftPolicy(challenger_on_warning=False, on_drift=('promote_challenger_if_better', 'lr_boost', \
'checkpoint'), lr_boost_factor=2.0, lr_boost_steps=7))
    """
    policy = DriftPolicy(
        challenger_on_warning=settings.trainer_drift_challenger_on_warning,
        on_drift=settings.trainer_drift_on_drift,
        lr_boost_factor=settings.trainer_drift_lr_boost_factor,
        lr_boost_steps=settings.trainer_drift_lr_boost_batches,
    )
    return (DriftMonitor.default() if settings.trainer_drift_enabled else None), policy
