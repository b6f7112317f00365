"""The trainer on example-batch records (stream_learner.events.batch), against the real broker and Valkey:
either format, interleaved, learns bit for bit what one-example records teach; a batch that does not parse
is dead-lettered whole, one bad example alone; a checkpoint inside a batch record resumes exactly."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch
from kafka import TopicPartition

from stream_learner.bus import H_ERROR_KIND, H_SOURCE_INDEX, H_SOURCE_OFFSET, ensure_topics, make_producer
from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.events import encode
from stream_learner.events.batch import BATCH_HEADERS, encode_batch
from stream_learner.learn.trainer import Trainer

from ..procs import read_topic, train_uninterrupted
from .streams import agrawal_examples
from .test_trainer import produce_examples, run_until

N = 3000


def own_topics(settings: Settings, tmp_path: Path, name: str) -> Settings:
    """The same trainer on topics and state of its own (a reference run beside the one under test)."""
    s = msgspec.structs.replace(
        settings,
        **{f"topic_{role}": f"{settings.topic_examples}.{name}.{role}" for role in settings.topics},
        trainer_state_dir=str(tmp_path / name),
    )
    ensure_topics(s)
    return s


def latest(settings: Settings, keys):
    return read_latest(settings, settings.topic_models, load_public_key(keys[1]), "m")


def assert_same_learning(got, want) -> None:
    assert got.manifest.counts == want.manifest.counts
    assert set(got.tensors) == set(want.tensors)
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), f"{name} differs"
    assert got.manifest.weights.sha256 == want.manifest.weights.sha256


@pytest.mark.slow
def test_a_topic_of_both_formats_interleaved_teaches_what_one_example_records_teach(
    tsettings: Settings, keys, tmp_path: Path
) -> None:
    examples = agrawal_examples(N, unlabeled=0.2, seed=5)
    examples = examples + examples[:300]  # duplicates, as a joiner re-emitting a whole batch
    reference = own_topics(msgspec.structs.replace(tsettings, examples_format="json"), tmp_path, "ref")
    train_uninterrupted(reference, produce_examples(reference, examples))

    # The same examples: runs of one-example records and of batch records, alternating.
    mixed, records, at = tsettings, 0, 0
    for k, size in enumerate([500, 700, 1, 899, 400, 500, 300]):
        fmt = "json" if k % 2 else "batch"
        records += produce_examples(
            msgspec.structs.replace(mixed, examples_format=fmt), examples[at : at + size], seed=k
        )
        at += size
    assert at == len(examples) and records < len(examples)
    train_uninterrupted(mixed, records)
    got, want = latest(mixed, keys), latest(reference, keys)
    assert_same_learning(got, want)
    assert got.manifest.counts["duplicates"] == 300
    assert got.manifest.input_offsets[0].offset == records


@pytest.mark.slow
def test_a_corrupt_batch_is_dead_lettered_whole_and_one_bad_example_alone(tsettings: Settings) -> None:
    good = [encode(ex) for ex in agrawal_examples(600, seed=9)]
    bad = b'{"example_id": "bad", "kind": "labeled"}'  # valid JSON, no example
    corrupt = encode_batch(good[:10])[:-7]  # cut: does not parse
    producer = make_producer(tsettings)
    topic = tsettings.topic_examples
    producer.send(topic, value=encode_batch(good[:200]), headers=BATCH_HEADERS)  # offset 0
    producer.send(topic, value=corrupt, headers=BATCH_HEADERS)  # 1: (copies of record 0's first ten)
    producer.send(topic, value=encode_batch([*good[200:250], bad, *good[250:400]]), headers=BATCH_HEADERS)  # 2
    producer.send(topic, key=b"k", value=good[400])  # 3: one example, the json format
    producer.send(topic, value=encode_batch(good[401:]), headers=BATCH_HEADERS)  # 4
    producer.flush()
    producer.close()

    trainer = Trainer(tsettings)
    try:
        run_until(trainer, 5)
        trainer.checkpoint()
    finally:
        trainer.close()
    assert trainer.learner.counts["labeled"] == 600
    letters = read_topic(tsettings, tsettings.topic_dlq)
    assert len(letters) == 2
    whole, alone = sorted(letters, key=lambda r: dict(r.headers)[H_SOURCE_OFFSET])
    assert whole.value == corrupt and dict(whole.headers)[H_ERROR_KIND] == b"bad_batch"
    assert dict(whole.headers)[H_SOURCE_OFFSET] == b"1" and H_SOURCE_INDEX not in dict(whole.headers)
    assert alone.value == bad
    assert dict(alone.headers)[H_SOURCE_OFFSET] == b"2" and dict(alone.headers)[H_SOURCE_INDEX] == b"50"


@pytest.mark.slow
def test_a_checkpoint_inside_a_batch_record_resumes_at_the_next_example(
    tsettings: Settings, keys, tmp_path: Path
) -> None:
    s = msgspec.structs.replace(tsettings, examples_format="batch", trainer_checkpoint_every_examples=700)
    records = produce_examples(s, agrawal_examples(N, unlabeled=0.2, seed=6), seed=3)
    reference = own_topics(s, tmp_path, "ref")
    assert produce_examples(reference, agrawal_examples(N, unlabeled=0.2, seed=6), seed=3) == records
    train_uninterrupted(reference, records)

    # Stopped (its work since the checkpoint lost) just after a checkpoint that fell inside a batch record.
    saved: list[tuple[dict[str, int], dict[str, int]]] = []  # (position, inside) of each checkpoint
    first = Trainer(s, on_checkpoint=lambda m: saved.append((dict(first.session.position), dict(first.session.inside))))
    try:
        for _ in range(10_000):
            first.step()
            if saved and saved[-1][1]:
                break
        else:
            raise AssertionError("no checkpoint fell inside a batch record")
        for _ in range(3):
            first.step()  # more learned, never saved
    finally:
        first.close()
    name = f"{s.topic_examples}:0"
    (offset, read), version = (saved[-1][0][name], saved[-1][1][name]), first.version
    assert read > 0

    second = Trainer(s)
    assert second.version == version and second.resume == {TopicPartition(s.topic_examples, 0): (offset, read)}
    assert second.session.inside == {name: read} and second.offsets == {0: offset}
    try:
        run_until(second, records)
        second.checkpoint()
    finally:
        second.close()
    assert_same_learning(latest(s, keys), latest(reference, keys))
