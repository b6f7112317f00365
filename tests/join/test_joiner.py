"""The joiner against the real local broker and Valkey."""

from __future__ import annotations

import msgspec
import pytest

from stream_learner.config import Settings

from .helpers import RunningJoiner, advance_all, label, prediction, produce, read_examples

T0 = 1_767_225_600_000
W = 10_000  # window, ms of event time


@pytest.fixture
def jsettings(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings, joiner_window_ms=W, joiner_late_retention_ms=60_000, joiner_orphan_retention_ms=60_000,
        joiner_group_id=f"{settings.topic_predictions}-joiner", joiner_redis_prefix=f"{{{settings.topic_predictions}}}:",
        joiner_idle_advance=False, consumer_session_timeout_ms=6000, consumer_max_poll_interval_ms=3000,
    )


def by_kind(examples):
    out: dict[str, set[str]] = {}
    for x in examples:
        out.setdefault(x.kind, set()).add(x.request_id)
    return out


def test_labeled_unlabeled_late_and_early(jsettings: Settings) -> None:
    events = [
        label(2, T0 + 500),            # early: before its prediction
        prediction(1, T0),
        prediction(2, T0 + 100),
        prediction(3, T0 + 200),       # never labeled
        prediction(4, T0 + 300),
        label(1, T0 + 1_000),          # within the window
        label(4, T0 + 300 + W + 5),    # past its window in event time: unlabeled + late
        prediction(5, T0 + 30_000),    # moves every partition's time on
        label(5, T0 + 30_001),
    ]
    produce(jsettings, events)
    advance_all(jsettings, T0 + 40_000)
    with RunningJoiner(jsettings) as joiner:
        examples = read_examples(jsettings, timeout_s=20, expect=9)
    kinds = by_kind(examples)
    assert kinds["labeled"] >= {"req-1", "req-2", "req-5"}
    assert {"req-3", "req-4"} <= kinds["unlabeled"]
    assert kinds["late"] == {"req-4"}
    assert joiner.counts.early_labels >= 1
    ex1 = next(x for x in examples if x.request_id == "req-1")
    assert ex1.label == "a" and ex1.prediction_time == T0 and ex1.label_time == T0 + 1000
    assert ex1.prediction_source.topic == jsettings.topic_predictions
    assert ex1.label_source.topic == jsettings.topic_labels
    assert len({x.example_id for x in examples}) == len(examples)
