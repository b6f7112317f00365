"""Each drift policy, through the real trainer on the local broker."""

from __future__ import annotations

import msgspec
import pytest

from stream_learner.config import Settings
from stream_learner.drift import DriftFinding, Signal
from stream_learner.events import DRIFT
from stream_learner.learn.trainer import Trainer

from ..procs import read_topic
from .streams import abrupt_drift
from .test_trainer import produce_examples

N, AT = 8000, 4000


def run(settings: Settings, **overrides) -> Trainer:
    s = msgspec.structs.replace(settings, trainer_checkpoint_every_examples=10**6, **overrides)
    produce_examples(s, abrupt_drift(N, AT))
    trainer = Trainer(s)
    try:
        while sum(trainer.offsets.values()) < N or trainer.buffer:
            trainer.step()
    finally:
        trainer.close()
    return trainer


def drift_events(settings: Settings) -> list:
    return [DRIFT.decode(r.value) for r in read_topic(settings, settings.topic_drift)]


@pytest.mark.slow
def test_abrupt_drift_is_detected_and_announced(tsettings: Settings) -> None:
    trainer = run(tsettings, trainer_drift_on_drift=["checkpoint"])
    drifts = [e for e in drift_events(tsettings) if e.kind == "drift"]
    assert drifts, "no drift event"
    first = min(e.details["index"] for e in drifts)
    assert AT <= first < AT + 1500, first  # found after the change, not before
    assert trainer.learner.drift_counts
    # The forced checkpoint published the post-drift state, with its drift state.
    assert trainer.published and trainer.published[0].drift_state


@pytest.mark.slow
def test_lr_boost(tsettings: Settings) -> None:
    trainer = run(
        tsettings,
        trainer_drift_on_drift=["lr_boost"],
        trainer_drift_lr_boost_batches=10**6,
        trainer_drift_lr_boost_factor=3.0,
    )
    lrs = {g["lr"] for g in trainer.learner.main.optimizer.param_groups}
    assert lrs == {tsettings.trainer_lr * 3.0}
    assert trainer.learner.stepper.lr.boost_left > 0


@pytest.mark.slow
def test_lr_boost_ends_after_its_batches(tsettings: Settings) -> None:
    trainer = run(tsettings, trainer_drift_on_drift=["lr_boost"], trainer_drift_lr_boost_batches=2)
    assert {g["lr"] for g in trainer.learner.main.optimizer.param_groups} == {tsettings.trainer_lr}


@pytest.mark.slow
def test_optimizer_reset(tsettings: Settings) -> None:
    trainer = run(tsettings, trainer_drift_on_drift=["optimizer_reset"])
    drifts = [e for e in drift_events(tsettings) if e.kind == "drift"]
    assert drifts and all("optimizer_reset" in e.actions for e in drifts)
    # Adam's step count restarted at the last reset: fewer steps than batches trained.
    steps = max(int(st["step"]) for st in trainer.learner.main.optimizer.state.values())
    assert steps < trainer.learner.counts["batches"]


@pytest.mark.slow
def test_challenger_started_at_warning_and_settled_at_drift(tsettings: Settings) -> None:
    # Which detector fires first depends on the stream; drive the policy with
    # a warning, then a drift, through the real trainer (its own detectors off).
    s = msgspec.structs.replace(
        tsettings,
        trainer_drift_challenger_on_warning=True,
        trainer_drift_enabled=False,
        trainer_drift_on_drift=["promote_challenger_if_better"],
    )
    produce_examples(s, abrupt_drift(2000, 1000))
    trainer = Trainer(s)
    try:
        while sum(trainer.offsets.values()) < 1000:
            trainer.step()
        trainer.session.answer(DriftFinding("adwin_error", "error", Signal.WARNING, 1.0, 1000), 1)
        assert trainer.learner.challenger is not None
        while sum(trainer.offsets.values()) < 2000 or trainer.buffer:
            trainer.step()  # the challenger learns the new concept from scratch, beside the main model
        main_before = trainer.learner.main
        trainer.session.answer(DriftFinding("adwin_error", "error", Signal.DRIFT, 1.0, 2000), 2)
        assert trainer.learner.challenger is None  # promoted or dropped, never left running
        challenger_won = trainer.learner.main is not main_before
        assert challenger_won == (
            trainer.learner.prequential.challenger_scores.means["accuracy"].cumulative
            > trainer.learner.prequential.champion_scores.means["accuracy"].cumulative
        )
    finally:
        trainer.close()
    events = [e for e in drift_events(s) if e.details["index"] in (1000, 2000)]
    assert [(e.kind, e.actions) for e in events] == [
        ("warning", ["alert", "start_challenger"]),
        ("drift", ["alert", "promote_challenger_if_better"]),
    ]


@pytest.mark.slow
def test_no_detection_when_disabled(tsettings: Settings) -> None:
    trainer = run(tsettings, trainer_drift_enabled=False)
    assert trainer.learner.drift is None and drift_events(tsettings) == []


@pytest.mark.parametrize("bad", [["explode"]])
def test_unknown_policy_action_is_a_config_error(bad) -> None:
    from stream_learner.config import load_settings
    from stream_learner.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer_drift_on_drift"):
        load_settings(env={"STREAM_LEARNER_TRAINER_DRIFT_ON_DRIFT": ",".join(bad)})
