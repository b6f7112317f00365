"""Poisoned input never reaches the weights; a loss spike is rolled back."""

from __future__ import annotations

import json
import math

import msgspec
import pytest
import torch
from kafka import TopicPartition

from stream_learner.bus import H_ERROR_KIND, make_consumer, make_producer
from stream_learner.checkpoint.reader import read_version
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.events import encode
from stream_learner.learn.trainer import Trainer

from .streams import agrawal_examples

SPIKE_AT = 64 * 40  # a chunk boundary: the whole flipped block lands in one mini-batch


def poisoned_records() -> tuple[list[bytes], int, int]:
    """Clean examples with 1% poison (NaN, Infinity, overflow, absurd magnitudes) and one flipped block."""
    records: list[bytes] = []
    refused = absurd = 0
    for i, ex in enumerate(agrawal_examples(6000, seed=11)):
        if len(records) == SPIKE_AT:
            for j, flipped in enumerate(agrawal_examples(64, seed=12)):
                # A whole batch far outside the data (every feature at the
                # clip) with alternating labels: the loss spikes.
                extreme = dict.fromkeys(flipped.features, 100000000.0 if j % 2 else -100000000.0)
                records.append(
                    encode(
                        msgspec.structs.replace(
                            flipped, features=extreme, label=str(j % 2), example_id="flip-" + flipped.example_id
                        )
                    )
                )
        raw = encode(ex)
        if i % 100 == 7:
            doc = json.loads(raw)
            kind = (i // 100) % 4
            if kind == 0:
                raw = raw.replace(b'"salary":', b'"salary":NaN,"x":', 1)
                refused += 1
            elif kind == 1:
                raw = raw.replace(b'"age":', b'"age":Infinity,"y":', 1)
                refused += 1
            elif kind == 2:
                raw = raw.replace(b'"loan":', b'"loan":1e400,"z":', 1)
                refused += 1
            else:
                doc["features"]["salary"] = 1e300  # valid JSON, absurd magnitude
                raw = json.dumps(doc).encode()
                absurd += 1
        records.append(raw)
    return records, refused, absurd


@pytest.mark.slow
def test_poison_and_a_loss_spike(tsettings: Settings, keys) -> None:
    records, refused, absurd = poisoned_records()
    settings = msgspec.structs.replace(
        tsettings, trainer_checkpoint_every_examples=640, trainer_spike_warmup_batches=10, trainer_spike_factor=2.0
    )
    producer = make_producer(settings)
    for raw in records:
        producer.send(settings.topic_examples, key=b"k", value=raw)
    producer.flush()
    producer.close()

    trainer = Trainer(settings)
    try:
        while sum(trainer.offsets.values()) < len(records) or trainer.buffer:
            trainer.step()
        trainer.checkpoint()
    finally:
        trainer.close()

    counts = trainer.learner.counts
    assert counts["rollbacks"] >= 1
    assert trainer.learner.featurizer.counts["out_of_range"] == absurd
    assert all(torch.isfinite(p).all() for p in trainer.learner.main.model.parameters())
    # Every published version holds finite weights, before and after the spike.
    public = load_public_key(keys[1])
    for manifest in trainer.published:
        loaded = read_version(settings, settings.topic_models, public, manifest.version, "m")
        assert all(torch.isfinite(t).all() for t in loaded.tensors.values() if t.is_floating_point())
        assert all(math.isfinite(v) for v in loaded.manifest.metrics.values())

    consumer = make_consumer(settings, group_id=None)
    tp = TopicPartition(settings.topic_dlq, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    letters = []
    while len(letters) < refused:
        letters += [r for batch in consumer.poll(2000).values() for r in batch]
    consumer.close()
    assert len(letters) == refused
    assert {dict(r.headers)[H_ERROR_KIND] for r in letters} == {b"non_finite"}


@pytest.mark.slow
def test_records_no_decoder_can_take_go_to_the_dead_letter_topic_and_training_goes_on(tsettings: Settings) -> None:
    good = agrawal_examples(300, seed=5)
    raw = encode(good[0])
    nest = b"[" * 10_000 + b"]" * 10_000
    poisons = [
        (raw[:-1] + b',"zz":' + nest + b"}", b"too_deep"),
        (raw.replace(b'"salary":', b'"salary":' + nest + b',"s":', 1), b"too_deep"),
        (raw[:-1] + b',"request_id":"another"}', b"duplicate_key"),
        (raw.replace(b'"features":{', b'"features":{"age":1.0,', 1), b"duplicate_key"),
        (raw[:-1] + b',"pad":"' + b"p" * (2 << 20) + b'"}', b"oversized"),
    ]
    producer = make_producer(tsettings, max_request_size=8 << 20)
    records = []
    for i, ex in enumerate(good):
        if i % 60 == 30:
            records.append(poisons[i // 60][0])
        records.append(encode(ex))
    for value in records:
        producer.send(tsettings.topic_examples, key=b"k", value=value)
    producer.flush()
    producer.close()

    trainer = Trainer(tsettings)
    try:
        while sum(trainer.offsets.values()) < len(records) or trainer.buffer:
            trainer.step()
        trainer.checkpoint()
    finally:
        trainer.close()
    assert trainer.learner.counts["labeled"] + trainer.learner.counts["pseudo"] + trainer.learner.counts[
        "pseudo_skipped"
    ] == len(good)
    consumer = make_consumer(tsettings, group_id=None)
    tp = TopicPartition(tsettings.topic_dlq, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    letters: list = []
    while len(letters) < len(poisons):
        letters += [r for batch in consumer.poll(2000).values() for r in batch]
    consumer.close()
    assert [dict(r.headers)[H_ERROR_KIND] for r in letters] == [kind for _, kind in poisons]
