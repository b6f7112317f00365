"""The trainer's sinks wait for their drift events as for their dead letters (a unit test of the logic;
the drift topic on the real broker is covered by test_drift_policy.py)."""

from __future__ import annotations

from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from stream_learner.config import Settings
from stream_learner.drift import DriftFinding, Signal
from stream_learner.learn.trainer import KafkaSinks
from stream_learner.metrics import Metrics
from stream_learner.util.retry import Retry


class Future:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class Producer:
    """Fails the first ``fail`` sends with ``error``."""

    def __init__(self, fail: int, error: Exception) -> None:
        self.fail, self.error = fail, error
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes, **_: Any) -> Future:
        self.sent.append((topic, key, value))
        return Future(self.error if len(self.sent) <= self.fail else None)

    def flush(self, timeout: float | None = None) -> None:
        pass


def finding() -> DriftFinding:
    return DriftFinding("adwin_error", "error", Signal.DRIFT, 0.4, 2047)


def test_a_drift_event_whose_send_failed_is_sent_again_until_acknowledged() -> None:
    producer = Producer(2, KafkaTimeoutError("no leader"))
    sinks = KafkaSinks(Settings(trainer_model="m"), producer, Metrics(), Retry("kafka", first=0.001, limit=0.002))  # type: ignore[arg-type]
    sinks.drift(finding(), [], event_time=1, model_version=3)
    sinks.flush()
    assert len(producer.sent) == 3 and len({v for _, _, v in producer.sent}) == 1  # the same event, sent again
    assert sinks.drifts == []


def test_a_permanent_failure_of_a_drift_event_is_raised_not_dropped() -> None:
    producer = Producer(1, TopicAuthorizationFailedError("no ACL for the drift topic"))
    sinks = KafkaSinks(Settings(trainer_model="m"), producer, Metrics(), Retry("kafka", first=0.001, limit=0.002))  # type: ignore[arg-type]
    sinks.drift(finding(), [], event_time=1, model_version=3)
    with pytest.raises(TopicAuthorizationFailedError):
        sinks.flush()
