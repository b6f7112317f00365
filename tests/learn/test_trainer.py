"""The trainer role against the real local broker (and Valkey for the Redis state store)."""

from __future__ import annotations

import random

import pytest

from stream_learner.bus import key_partition, make_producer
from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.events import encode
from stream_learner.events.batch import BATCH_HEADERS, encode_batch
from stream_learner.learn.trainer import Trainer

from .streams import AGRAWAL_FEATURES, agrawal_examples


def produce_examples(settings: Settings, examples, *, seed: int = 0) -> int:
    """Write ``examples`` to the examples topic in ``settings.examples_format``; return the records written.

    The batch format puts each partition's examples (murmur2 of the request id, as the joiner) in records
    of 1 to 300 examples (seeded), so chunks and checkpoints fall inside batch records.
    """
    producer = make_producer(settings)
    topic, records = settings.topic_examples, 0
    if settings.examples_format == "batch":
        rng = random.Random(seed)
        partitions = sorted(producer.partitions_for(topic))
        by_partition: dict[int, list[bytes]] = {}
        for ex in examples:
            by_partition.setdefault(key_partition(ex.request_id.encode(), partitions), []).append(encode(ex))
        for partition, values in by_partition.items():
            start = 0
            while start < len(values):
                end = start + rng.randint(1, 300)
                producer.send(topic, value=encode_batch(values[start:end]), partition=partition, headers=BATCH_HEADERS)
                start, records = end, records + 1
    else:
        for ex in examples:
            producer.send(topic, key=ex.request_id.encode(), value=encode(ex))
            records += 1
    producer.flush()
    producer.close()
    return records


def run_until(trainer: Trainer, applied: int, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        trainer.step()
        if sum(trainer.offsets.values()) >= applied and not trainer.buffer:
            return
    raise AssertionError(f"applied only {trainer.offsets} of {applied}")


@pytest.mark.slow
def test_trains_and_publishes_signed_checkpoints(tsettings: Settings, keys) -> None:
    produce_examples(tsettings, agrawal_examples(3000))
    trainer = Trainer(tsettings)
    try:
        run_until(trainer, 3000)
        trainer.checkpoint()
    finally:
        trainer.close()
    versions = [m.version for m in trainer.published]
    assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 3
    latest = read_latest(tsettings, tsettings.topic_models, load_public_key(keys[1]), "m")
    assert latest.manifest.version == versions[-1]
    assert latest.manifest.counts["labeled"] == 3000
    assert latest.manifest.input_offsets[0].offset == 3000
    assert latest.manifest.metrics["accuracy"] > 0.6
    assert latest.manifest.feature_spec == AGRAWAL_FEATURES
    assert set(latest.tensors) >= {"model.0.weight", "featurizer.mean"}


@pytest.mark.slow
def test_restart_resumes_from_its_state_not_from_kafka(tsettings: Settings) -> None:
    stream = agrawal_examples(2000)
    produce_examples(tsettings, stream)
    first = Trainer(tsettings)
    try:
        run_until(first, 1000, max_steps=50)
    except AssertionError:
        pass
    finally:
        first.close()
    # Resume: the restored trainer continues at its last checkpoint's offsets.
    second = Trainer(tsettings)
    resumed_at = dict(second.offsets)
    try:
        run_until(second, 2000)
        second.checkpoint()
    finally:
        second.close()
    assert first.published and resumed_at == {0: first.published[-1].input_offsets[0].offset}
    assert second.learner.counts["labeled"] == 2000  # none applied twice, none skipped
    versions = [m.version for m in first.published + second.published]
    assert versions == list(range(1, len(versions) + 1))


@pytest.mark.slow
def test_rolling_metrics_and_consumer_lag_are_gauges_with_the_model_label(tsettings: Settings) -> None:
    from stream_learner.metrics import Metrics

    produce_examples(tsettings, agrawal_examples(2000, unlabeled=0.2))
    metrics = Metrics(roles=["trainer"])
    metrics.rolling_every_s = 0  # every chunk, so the last values are the learner's last
    trainer = Trainer(tsettings, metrics=metrics)
    try:
        run_until(trainer, 2000)
        trainer.step()
        summary = trainer.learner.summary()
    finally:
        trainer.close()
    value = metrics.registry.get_sample_value
    for name in ("accuracy", "log_loss", "served_accuracy"):
        gauge = value(f"stream_learner_trainer_rolling_{name}", {"model": "m"})
        assert gauge == summary[f"{name}_rolling"], name
    assert 0.5 < value("stream_learner_trainer_rolling_accuracy", {"model": "m"}) <= 1
    assert value("stream_learner_trainer_rolling_mae", {"model": "m"}) is None  # a classifier: no MAE
    assert value("stream_learner_trainer_consumer_lag_records") == 0
    healthy, body = metrics.health.status()
    assert healthy and body["roles"]["trainer"]["unread_records"] == 0
