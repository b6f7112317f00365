"""Publishing to and reading from the model topic, against the real local broker."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from stream_learner.bus import kafka_options
from stream_learner.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    DigestError,
    IncompleteCheckpointError,
    SignatureError,
    publish_checkpoint,
    read_latest,
    read_version,
    sign_manifest,
    weights_info,
)
from stream_learner.checkpoint.publish import (
    H_CHUNK_COUNT,
    H_CHUNK_INDEX,
    H_MODEL,
    H_SHA256,
    H_TYPE,
    H_VERSION,
)
from stream_learner.config import Settings
from stream_learner.events import MANIFEST, encode

from .conftest import Acked, CountingConsumer, TamperingProducer, assert_bit_identical, checkpoint_bytes, manifest_for

CHUNK = 512 * 1024


def publish(
    producer: Any,
    topic: str,
    key: Any,
    version: int,
    model: str = "churn",
    hidden: int = 1024,
    chunk_bytes: int = CHUNK,
    created_at: int | None = None,
):
    state, data = checkpoint_bytes(version, hidden)
    signed = publish_checkpoint(
        producer, topic, manifest_for(data, model, version, created_at), data, key, chunk_bytes=chunk_bytes
    )
    return state, data, signed


def manifest_headers(manifest) -> list[tuple[str, bytes]]:
    return [(H_TYPE, b"manifest"), (H_MODEL, manifest.model.encode()), (H_VERSION, str(manifest.version).encode())]


def send_manifest(producer: Any, topic: str, manifest) -> int:
    """Produce a hand-made manifest record; return its offset."""
    return (
        producer.send(topic, key=manifest.model.encode(), value=encode(manifest), headers=manifest_headers(manifest))
        .get(timeout=30)
        .offset
    )


# -- one partition, the default -------------------------------------------------


@pytest.mark.slow
def test_five_versions_latest_and_named_versions_are_bit_identical(
    settings: Settings, producer, consumer, keypair
) -> None:
    private, public = keypair
    topic = settings.topic_models
    published = {v: publish(producer, topic, private, v) for v in range(1, 6)}
    state5, data5, signed5 = published[5]
    assert sum(p.numel() for p in state5.values()) > 1_000_000
    assert signed5.weights.chunks == -(-len(data5) // CHUNK) >= 8  # ~4.2 MB in 512 KiB chunks
    assert len(signed5.weights.chunk_offsets) == signed5.weights.chunks

    latest = read_latest(consumer, topic, public, "churn")
    assert latest.manifest == signed5 and latest.manifest.version == 5
    assert_bit_identical(latest.tensors, state5)
    assert latest.metadata == {"version": "5"}
    # Newest manifest, then exactly its chunks: nothing else read.
    assert consumer.records == signed5.weights.chunks + 1

    v3 = read_version(consumer, topic, public, 3, "churn")
    assert v3.manifest == published[3][2]
    assert_bit_identical(v3.tensors, published[3][0])
    assert v3.offset < latest.offset

    # Settings instead of a consumer, and no model filter.
    assert read_latest(settings, topic, public).manifest == signed5
    assert read_version(settings, topic, public, 1).manifest.version == 1


@pytest.mark.slow
def test_latest_reads_a_handful_of_records_after_50_versions(settings: Settings, producer, consumer, keypair) -> None:
    private, public = keypair
    topic = settings.topic_models
    # A smaller state in 64 KiB chunks keeps 50 versions quick; still several chunks each.
    for v in range(1, 51):
        _, _, signed = publish(producer, topic, private, v, hidden=64, chunk_bytes=64 * 1024)
    per_version = signed.weights.chunks + 1
    assert per_version >= 3
    latest = read_latest(consumer, topic, public, "churn")
    assert latest.manifest.version == 50
    assert consumer.records == per_version < 2 * per_version

    consumer.records = 0
    assert read_version(consumer, topic, public, 45).manifest.version == 45
    # Back over five newer versions (windows double, so at most twice that), then its chunks.
    assert consumer.records <= 2 * 6 * per_version


@pytest.mark.slow
def test_the_newest_manifest_of_the_requested_model_is_found_among_others(
    settings: Settings, producer, consumer, keypair
) -> None:
    private, public = keypair
    topic = settings.topic_models
    publish(producer, topic, private, 1, model="churn", hidden=32, chunk_bytes=4096)
    _, _, churn2 = publish(producer, topic, private, 2, model="churn", hidden=32, chunk_bytes=4096)
    for v in range(1, 8):
        _, _, fraud = publish(producer, topic, private, v, model="fraud", hidden=32, chunk_bytes=4096)
    assert read_latest(consumer, topic, public, "churn").manifest == churn2
    assert read_latest(consumer, topic, public, "fraud").manifest == fraud
    assert read_latest(consumer, topic, public).manifest == fraud
    with pytest.raises(CheckpointNotFoundError, match="'churn' version 3"):
        read_version(consumer, topic, public, 3, "churn")


def test_nothing_published_yet(settings: Settings, consumer, keypair) -> None:
    with pytest.raises(CheckpointNotFoundError):
        read_latest(consumer, settings.topic_models, keypair[1], "churn")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_latest(consumer, f"{settings.topic_models}.missing-{uuid.uuid4().hex[:6]}", keypair[1])


# -- what must be refused -------------------------------------------------------


def test_a_manifest_signed_by_another_key_is_refused(
    settings: Settings, producer, consumer, keypair, other_keypair
) -> None:
    topic = settings.topic_models
    publish(producer, topic, keypair[0], 1, hidden=32, chunk_bytes=4096)
    publish(producer, topic, other_keypair[0], 2, hidden=32, chunk_bytes=4096)
    with pytest.raises(SignatureError, match="churn v2"):
        read_latest(consumer, topic, keypair[1], "churn")
    # The newest is authoritative: no silent fallback to v1. v1 itself is fine.
    assert read_version(consumer, topic, keypair[1], 1).manifest.version == 1


def test_missing_or_foreign_chunks_are_incomplete(settings: Settings, producer, consumer, keypair) -> None:
    private, public = keypair
    topic = settings.topic_models
    _, _, v1 = publish(producer, topic, private, 1, hidden=64, chunk_bytes=16 * 1024)
    _, _data2, v2 = publish(producer, topic, private, 2, hidden=64, chunk_bytes=16 * 1024)
    n = v2.weights.chunks

    def forge(**weights: Any) -> None:
        manifest = msgspec.structs.replace(
            v2, version=3, parent=2, weights=msgspec.structs.replace(v2.weights, **weights)
        )
        send_manifest(producer, topic, sign_manifest(manifest, private))

    # Signed, but its chunks are another version's (v1's offsets).
    forge(chunk_offsets=v1.weights.chunk_offsets[:n] + [v1.weights.chunk_offsets[0]] * max(0, n - v1.weights.chunks))
    with pytest.raises(IncompleteCheckpointError, match="not its chunk 0"):
        read_latest(consumer, topic, public, "churn")
    # More chunks than were ever produced.
    forge(chunks=n + 1, chunk_offsets=v2.weights.chunk_offsets + [v2.weights.chunk_offsets[-1] + 10**6])
    with pytest.raises(IncompleteCheckpointError, match="outside"):
        read_latest(consumer, topic, public, "churn")
    # Fewer offsets than chunks.
    forge(chunk_offsets=v2.weights.chunk_offsets[:-1])
    with pytest.raises(IncompleteCheckpointError, match="offsets for"):
        read_latest(consumer, topic, public, "churn")
    # An offset that holds a manifest, not a chunk.
    forge(chunk_offsets=v2.weights.chunk_offsets[:-1] + [v2.weights.chunk_offsets[-1] + 1])
    with pytest.raises(IncompleteCheckpointError, match="not its chunk"):
        read_latest(consumer, topic, public, "churn")
    # v2 itself is intact.
    assert read_version(consumer, topic, public, 2).manifest == v2


def test_a_tampered_chunk_fails_the_digest(settings: Settings, producer, consumer, keypair) -> None:
    private, public = keypair
    topic = settings.topic_models
    publish(TamperingProducer(producer, chunk_index=2), topic, private, 1, hidden=64, chunk_bytes=16 * 1024)
    with pytest.raises(DigestError, match="sha256"):
        read_latest(consumer, topic, public, "churn")


def test_a_chunk_of_the_wrong_length_fails_the_digest(settings: Settings, producer, consumer, keypair) -> None:
    private, public = keypair
    topic = settings.topic_models
    _, data, _ = publish(producer, topic, private, 1, hidden=16, chunk_bytes=1 << 20)
    info = weights_info(data, 1 << 20)
    headers = [
        (H_TYPE, b"chunk"),
        (H_MODEL, b"churn"),
        (H_VERSION, b"2"),
        (H_CHUNK_COUNT, b"1"),
        (H_SHA256, info.sha256.encode()),
        (H_CHUNK_INDEX, b"0"),
    ]
    off = producer.send(topic, key=b"churn", value=data + b"!", headers=headers).get(timeout=30).offset
    manifest = manifest_for(data, version=2)
    send_manifest(
        producer,
        topic,
        sign_manifest(
            msgspec.structs.replace(manifest, weights=msgspec.structs.replace(info, chunk_offsets=[off])), private
        ),
    )
    with pytest.raises(DigestError, match="bytes"):
        read_latest(consumer, topic, public, "churn")


def test_garbage_claiming_to_be_a_manifest_is_refused(settings: Settings, producer, consumer, keypair) -> None:
    topic = settings.topic_models
    producer.send(
        topic,
        key=b"churn",
        value=b'{"model": "churn"}',
        headers=[(H_TYPE, b"manifest"), (H_MODEL, b"churn"), (H_VERSION, b"1")],
    ).get(timeout=30)
    with pytest.raises(CheckpointError, match="invalid"):
        read_latest(consumer, topic, keypair[1], "churn")


def test_headers_that_disagree_with_the_signed_manifest_are_refused(
    settings: Settings, producer, consumer, keypair
) -> None:
    private, public = keypair
    topic = settings.topic_models
    _, _, v1 = publish(producer, topic, private, 1, hidden=16, chunk_bytes=1 << 20)
    # A replayed v1 manifest relabelled as v9 must not be returned as v9.
    producer.send(
        topic, key=b"churn", value=encode(v1), headers=[(H_TYPE, b"manifest"), (H_MODEL, b"churn"), (H_VERSION, b"9")]
    ).get(timeout=30)
    with pytest.raises(CheckpointError, match="headers say"):
        read_version(consumer, topic, public, 9, "churn")


def test_publish_refuses_a_manifest_that_describes_other_bytes(settings: Settings, producer, keypair) -> None:
    _, data = checkpoint_bytes(1, hidden=16)
    with pytest.raises(DigestError, match="describes"):
        publish_checkpoint(producer, settings.topic_models, manifest_for(data + b"x"), data, keypair[0])


# -- order and layout, without a broker -----------------------------------------


class RecordingProducer:
    """Stores sends in memory and acknowledges them at once, like a one-partition log."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []

    def send(
        self, topic: str, *, key: bytes, value: bytes, headers: list[tuple[str, bytes]], partition: int | None = None
    ) -> Acked:
        self.log.append({"key": key, "value": value, "headers": dict(headers), "partition": partition})
        return Acked(partition or 0, len(self.log) - 1)


def test_chunks_first_then_the_signed_manifest_pointing_at_them(keypair) -> None:
    private, public = keypair
    _, data = checkpoint_bytes(1, hidden=64)
    recorder = RecordingProducer()
    signed = publish_checkpoint(recorder, "sl.models", manifest_for(data), data, private, chunk_bytes=10_000)
    *chunks, last = recorder.log
    assert last["headers"][H_TYPE] == b"manifest" and MANIFEST.decode(last["value"]) == signed
    assert [c["headers"][H_TYPE] for c in chunks] == [b"chunk"] * signed.weights.chunks
    assert signed.weights.chunk_offsets == list(range(len(chunks)))
    assert b"".join(c["value"] for c in chunks) == data
    assert all(len(c["value"]) <= 10_000 for c in chunks)
    assert [c["headers"][H_CHUNK_INDEX] for c in chunks] == [str(i).encode() for i in range(len(chunks))]
    assert {c["key"] for c in recorder.log} == {b"churn"}
    # Everything after the first chunk is pinned to the first chunk's partition.
    assert [r["partition"] for r in recorder.log] == [None] + [0] * len(chunks)
    from stream_learner.checkpoint import verify_manifest

    verify_manifest(signed, public)


# -- several partitions -----------------------------------------------------------


@pytest.mark.slow
def test_every_partition_is_searched(settings: Settings, producer, keypair) -> None:
    private, public = keypair
    topic = f"{settings.topic_models}.p3"
    admin = KafkaAdminClient(**kafka_options(settings))
    try:
        admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        admin.close()
    models = [f"m{i}" for i in range(8)]
    newest: dict[str, Any] = {}
    t = 1_767_225_600_000
    for version in (1, 2):
        for model in models:
            t += 1
            newest[model] = publish(
                producer, topic, private, version, model=model, hidden=16, chunk_bytes=8 * 1024, created_at=t
            )[2]
    partitions = set()
    for model in models:
        c = CountingConsumer(make_consumer_for(settings))
        try:
            loaded = read_latest(c, topic, public, model)
            if model == models[-1]:
                # The newest of all: its records, plus one record per other partition
                # (older than it, so that partition's search stops there).
                assert c.records <= loaded.manifest.weights.chunks + 1 + 2
            assert loaded.manifest == newest[model]
            partitions.add(loaded.partition)
            assert read_version(c, topic, public, 1, model).manifest.version == 1
        finally:
            c.inner.close()
    assert len(partitions) >= 2, "the models should spread over several partitions"
    assert read_latest(settings, topic, public).manifest == newest[models[-1]]


def make_consumer_for(settings: Settings) -> Any:
    from stream_learner.checkpoint import make_reader_consumer

    return make_reader_consumer(settings)


# -- failures while publishing ----------------------------------------------------


class FailingProducer:
    """Fails the send of one chunk, like a broker that stops answering mid-checkpoint."""

    def __init__(self, inner: Any, chunk_index: int) -> None:
        self.inner = inner
        self.chunk_index = str(chunk_index).encode()

    def send(self, topic: str, **kwargs: Any) -> Any:
        if (H_CHUNK_INDEX, self.chunk_index) in kwargs["headers"]:
            from kafka.errors import KafkaTimeoutError

            raise KafkaTimeoutError("simulated: broker unavailable")
        return self.inner.send(topic, **kwargs)


def test_a_failed_publish_shows_no_manifest_and_can_be_retried(settings: Settings, producer, consumer, keypair) -> None:
    private, public = keypair
    topic = settings.topic_models
    _, _, v1 = publish(producer, topic, private, 1, hidden=64, chunk_bytes=16 * 1024)
    with pytest.raises(CheckpointError, match="refused a record"):
        publish(FailingProducer(producer, chunk_index=3), topic, private, 2, hidden=64, chunk_bytes=16 * 1024)
    # Chunks 0-2 of v2 are on the topic, but no manifest points at them.
    assert read_latest(consumer, topic, public, "churn").manifest == v1
    state2, _, v2 = publish(producer, topic, private, 2, hidden=64, chunk_bytes=16 * 1024)
    latest = read_latest(consumer, topic, public, "churn")
    assert latest.manifest == v2
    assert_bit_identical(latest.tensors, state2)


def test_a_chunk_above_the_brokers_limit_is_refused_before_any_manifest(
    settings: Settings, producer, consumer, keypair
) -> None:
    with pytest.raises(CheckpointError, match=r"chunk 0|refused"):
        publish(producer, settings.topic_models, keypair[0], 1, chunk_bytes=2 * 1024 * 1024)
    with pytest.raises(CheckpointNotFoundError):
        read_latest(consumer, settings.topic_models, keypair[1], "churn")


def test_records_without_the_key_at_the_end_do_not_stop_the_trainer_numbering_its_versions(
    settings: Settings, producer, consumer, keypair
) -> None:
    from stream_learner.checkpoint.output import TopicOutput

    private, public = keypair
    topic = settings.topic_models
    publish(producer, topic, private, 1, hidden=16, chunk_bytes=1 << 20)
    _, _, v2 = publish(producer, topic, private, 2, hidden=16, chunk_bytes=1 << 20)
    headers = [(H_TYPE, b"manifest"), (H_MODEL, b"churn"), (H_VERSION, b"99")]
    producer.send(topic, key=b"churn", value=b"\x00\x01\x02\x03", headers=headers).get(timeout=30)  # unsigned
    forged = msgspec.structs.replace(v2, version=99)  # its signature no longer matches
    send_manifest(producer, topic, forged)
    with pytest.raises(CheckpointError):
        read_latest(consumer, topic, public, "churn")  # the strict reader names what is at the end
    output = TopicOutput(settings, "churn", private, producer=producer)
    try:
        assert output.latest_version() == 2  # was: the trainer's start raised, and so every restart
    finally:
        output.close()
