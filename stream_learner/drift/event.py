"""The ``drift.v1`` event of a finding, and its id: a hash of model, detector and example index.

The example index is the example's position in the trainer's input, the same
on a replay, so a replay publishes the same event ids (and consumers can
deduplicate on them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Literal

from ..events import DriftEvent
from .detectors import Signal
from .monitor import DriftFinding
from .policy import Action, LrBoost


def drift_event_id(model: str, detector: str, index: int) -> str:
    """The event id of a finding: a hash of model, detector and example index, so a replay repeats it.

    >>> drift_event_id("churn", "adwin_error", 2047) == drift_event_id("churn", "adwin_error", 2047)
    True
    """
    # JSON keeps the parts apart ("a:b" + "c" never collides with "a" + "b:c").
    key = json.dumps(["drift.v1", model, detector, index], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def drift_event(
    finding: DriftFinding,
    actions: Iterable[Action],
    *,
    model: str,
    event_time: int,
    model_version: int | None = None,
) -> DriftEvent:
    """The ``drift.v1`` event announcing ``finding`` and the ``actions`` taken.

    ``event_time`` is the example's event time (so a replay writes the same
    event); the example index and any learning-rate boost go in ``details``.

    >>> from stream_learner.drift import Alert, LrBoost, Signal
    >>> finding = DriftFinding("adwin_error", "error", Signal.DRIFT, 1.0, 2047)
    >>> event = drift_event(finding, [Alert(), LrBoost(2.0, 100)], model="churn", event_time=1_767_225_600_000)
    >>> event.kind, event.actions, event.details
    ('drift', ['alert', 'lr_boost'], {'index': 2047, 'lr_boost_factor': 2.0, 'lr_boost_steps': 100})
    """
    actions = list(actions)
    kind: Literal["warning", "drift"] = "drift" if finding.kind is Signal.DRIFT else "warning"
    details: dict[str, float] = {"index": finding.index}
    for action in actions:
        if isinstance(action, LrBoost):
            details["lr_boost_factor"] = action.factor
            details["lr_boost_steps"] = action.steps
    return DriftEvent(
        event_id=drift_event_id(model, finding.detector, finding.index),
        model=model,
        event_time=event_time,
        kind=kind,
        detector=finding.detector,
        signal=finding.signal,
        model_version=model_version,
        value=finding.value,
        actions=[a.kind for a in actions],
        details=details,
    )
