"""Events written by a non-Python client (librdkafka via confluent-kafka) are read like ours."""

from __future__ import annotations

import json

import pytest

from stream_learner.config import Settings
from stream_learner.tools.smoke import decode_topics

confluent_kafka = pytest.importorskip("confluent_kafka")


def test_librdkafka_producer_events_decode(settings: Settings) -> None:
    # librdkafka's default partitioner (consistent_random, CRC32) differs from
    # kafka-python's murmur2: nothing may depend on where a key lands.
    producer = confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True})
    n = 500
    for i in range(n):
        prediction = {
            "event_id": f"c-p{i}",
            "request_id": f"req-{i}",
            "model": "m",
            "model_version": "1",
            "event_time": 1_767_225_600_000 + i,
            "features": {"x": i * 0.5},
            "prediction": {"a": 0.9, "b": 0.1},
        }
        label = {"event_id": f"c-l{i}", "request_id": f"req-{i}", "event_time": 1_767_225_600_500 + i, "label": "a"}
        producer.produce(settings.topic_predictions, key=f"req-{i}", value=json.dumps(prediction))
        producer.produce(settings.topic_labels, key=f"req-{i}", value=json.dumps(label))
    assert producer.flush(30) == 0
    report = decode_topics(settings, expected=2 * n)
    assert report.decoded == {"prediction": n, "label": n}
    assert report.event_ids == {f"c-p{i}" for i in range(n)} | {f"c-l{i}" for i in range(n)}
