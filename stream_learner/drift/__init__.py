"""Drift detection for the trainer: River detectors behind one small interface, and the drift policy.

The trainer feeds every example's signals to a :class:`DriftMonitor`: the 0/1
prequential ``error`` and the ``loss`` once a label is known, and the
label-free ``confidence`` (the max class probability of the prediction) and
``feature:<name>`` values at once, since labels lag or never come. Each
:class:`Detector` turns a stream of floats into a :class:`Signal`
(``none``, ``warning`` or ``drift``); the monitor turns those into findings
(:class:`DriftFinding`), :class:`DriftPolicy` turns a finding into typed
actions, and :func:`drift_event` into the ``drift.v1`` event the trainer
publishes (its id is a hash of model, detector and example index, so a replay
publishes the same ids).

Detectors (DESIGN.md, "trainer"):

* :class:`ADWINDetector` -- ADWIN on the error stream (the default), and on
  confidence and standardized features. River's ADWIN only signals drift; the
  warning comes from a second, more sensitive ADWIN (larger ``delta``).
* :class:`PageHinkleyDetector` -- River's Page-Hinkley on the loss.

Detector state is part of the trainer's snapshot and must survive restarts
without pickle: explicit msgspec structs (:mod:`.state`), as plain JSON.

>>> import json, random
>>> rng = random.Random(7)
>>> monitor = DriftMonitor.from_config()        # ADWIN on error and confidence, Page-Hinkley on loss
>>> policy = DriftPolicy(challenger_on_warning=True)
>>> findings = []
>>> for i in range(4000):                       # the model's error rate jumps from 10% to 50% at 2000
...     findings += monitor.observe("error", rng.random() < (0.1 if i < 2000 else 0.5), index=i)
>>> [(f.detector, f.kind.value, f.index) for f in findings]
[('adwin_error', 'drift', 2047)]
>>> actions = policy.decide(findings[0])
>>> [a.kind for a in actions]
['alert', 'lr_boost', 'checkpoint']
>>> event = drift_event(findings[0], actions, model="churn", event_time=1_767_225_600_000)
>>> event.event_id == drift_event_id("churn", "adwin_error", 2047)
True
>>> saved = json.dumps(monitor.state())         # plain JSON: no pickle, no code on restore
>>> restored = DriftMonitor.from_config()
>>> restored.restore(json.loads(saved))         # detectors that start fresh, and why
{}
"""

from .adwin import ADWIN
from .config import DetectorConfig, DriftConfig, PolicyConfig, build_detector, load_drift_config
from .detectors import ADWINDetector, Detector, PageHinkleyDetector, Signal
from .event import drift_event, drift_event_id
from .monitor import DriftFinding, DriftMonitor
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
    "Checkpoint",
    "Detector",
    "DetectorConfig",
    "DriftConfig",
    "DriftFinding",
    "DriftMonitor",
    "DriftPolicy",
    "DriftStateError",
    "IncompatibleStateError",
    "LrBoost",
    "OptimizerReset",
    "PageHinkleyDetector",
    "PolicyConfig",
    "PromoteChallengerIfBetter",
    "Signal",
    "StartChallenger",
    "build_detector",
    "drift_event",
    "drift_event_id",
    "load_drift_config",
]

