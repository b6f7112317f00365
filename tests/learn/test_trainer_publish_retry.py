"""A checkpoint publish the broker fails transiently is retried, stoppably, not fatal (the real local broker)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from stream_learner.checkpoint.errors import CheckpointError
from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.learn.trainer import Trainer
from stream_learner.util.retry import Stopped

from .streams import agrawal_examples
from .test_trainer import produce_examples, run_until


class Failing:
    """Makes the producer's next ``n`` sends raise ``error`` (as kafka-python's send does when the
    broker's metadata cannot be had within max_block_ms), then passes them through to the real one."""

    def __init__(self, producer: Any, n: int, error: Exception) -> None:
        self.real, self.n, self.error, self.failed = producer.send, n, error, 0
        producer.send = self.send

    def send(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed < self.n:
            self.failed += 1
            raise self.error
        return self.real(*args, **kwargs)


def retries(trainer: Trainer) -> float:
    value = trainer.metrics.registry.get_sample_value("stream_learner_trainer_retries_total", {"dependency": "kafka"})
    return value or 0.0


@pytest.mark.slow
def test_a_transient_publish_failure_is_retried_and_the_checkpoint_published(tsettings: Settings, keys) -> None:
    produce_examples(tsettings, agrawal_examples(200))
    trainer = Trainer(tsettings)
    try:
        run_until(trainer, 200)
        failing = Failing(trainer.producer, 3, KafkaTimeoutError("Failed to update metadata after 60.0 secs."))
        trainer.checkpoint()  # did not raise: published after three failed tries
        assert failing.failed == 3 and retries(trainer) == 3.0
    finally:
        trainer.close()
    latest = read_latest(tsettings, tsettings.topic_models, load_public_key(keys[1]), "m")
    assert latest.manifest.version == trainer.published[-1].version
    assert latest.manifest.counts["labeled"] == trainer.published[-1].counts["labeled"]


def test_a_permanent_publish_failure_is_raised_at_once(tsettings: Settings) -> None:
    produce_examples(tsettings, agrawal_examples(100))
    trainer = Trainer(tsettings)
    try:
        run_until(trainer, 100)
        Failing(trainer.producer, 1, TopicAuthorizationFailedError())
        with pytest.raises(CheckpointError, match="refused a record"):
            trainer.checkpoint()
        assert retries(trainer) == 0.0
    finally:
        trainer.close()


@pytest.mark.slow
def test_a_stop_ends_a_publish_waiting_for_the_broker(tsettings: Settings) -> None:
    produce_examples(tsettings, agrawal_examples(100))
    stop = threading.Event()
    trainer = Trainer(tsettings, stop=stop)
    try:
        run_until(trainer, 100)
        Failing(trainer.producer, 10**9, KafkaTimeoutError("broker away"))
        threading.Timer(0.5, stop.set).start()
        started = time.monotonic()
        with pytest.raises(Stopped):
            trainer.checkpoint()
        assert time.monotonic() - started < 5.0
    finally:
        trainer.close()
