"""Bad input is refused with the field and the reason, and goes to the dead-letter topic."""

from __future__ import annotations

import json

import msgspec
import pytest
from kafka import TopicPartition

from stream_learner.bus import (
    H_ERROR_FIELD,
    H_ERROR_KIND,
    H_SOURCE_OFFSET,
    H_SOURCE_TOPIC,
    make_consumer,
    make_producer,
)
from stream_learner.config import Settings
from stream_learner.errors import EventError
from stream_learner.events import LABEL, PREDICTION, Codec, PredictionEvent
from stream_learner.tools.smoke import decode_topics

GOOD = {
    "event_id": "e1",
    "request_id": "r1",
    "model": "m",
    "model_version": "1",
    "event_time": 1,
    "features": {"a": 1.5, "b": None},
    "prediction": {"x": 0.25, "y": 0.75},
}


def variant(**changes: object) -> bytes:
    doc = {**GOOD, **changes}
    for key, value in list(changes.items()):
        if value is ...:
            del doc[key]
    return json.dumps(doc, allow_nan=True).encode()


CASES = [
    ("invalid JSON", b'{"event_id": "e1", ', "malformed_json", "$", "truncated"),
    ("not UTF-8", b"\xff\xfe\x00", "malformed_json", "$", "invalid character"),
    ("missing field", variant(request_id=...), "missing_field", "$.request_id", "missing required field"),
    # prediction.v2: a string is a category or a text (whether it fits is the model's featurizer's to say).
    ("wrong type: object feature", variant(features={"a": {"x": 1}}), "wrong_type", "$.features.a", "got `object`"),
    (
        "wrong type: vector of strings",
        variant(features={"a": [1.0, "2"]}),
        "wrong_type",
        "$.features.a[1]",
        "got `str`",
    ),
    ("non-finite in a vector", variant(features={"a": [1.0, float("nan")]}), "non_finite", "$.features.a[1]", "NaN"),
    ("wrong type: bool feature", variant(features={"a": True}), "wrong_type", "$.features.a", "got `bool`"),
    ("wrong type: version", variant(model_version=3), "wrong_type", "$.model_version", "got `int`"),
    ("wrong type: top level", b"[1, 2]", "wrong_type", "$", "got `array`"),
    ("NaN feature", variant(features={"a": 1.0, "b": float("nan")}), "non_finite", "$.features.b", "NaN"),
    ("Infinity prediction", variant(prediction=float("inf")), "non_finite", "$.prediction", "NaN and Infinity"),
    (
        "overflowing number",
        (
            b'{"event_id":"e1","request_id":"r1","model":"m","model_version":"1",'
            b'"event_time":1,"features":{"a":1e400},"prediction":0.5}'
        ),
        "non_finite",
        "$.features.a",
        "finite double",
    ),
    ("probability above 1", variant(prediction={"x": 1.5}), "invalid_value", "$.prediction.x", "<= 1.0"),
    ("negative event time", variant(event_time=-5), "invalid_value", "$.event_time", ">= 0"),
    ("empty request id", variant(request_id=""), "invalid_value", "$.request_id", "length >= 1"),
    ("empty feature name", variant(features={"": 1.0}), "invalid_value", "$.features", "key is invalid"),
    (
        "too many features",
        variant(features={f"f{i}": 0.0 for i in range(4097)}),
        "invalid_value",
        "$.features",
        "length <= 4096",
    ),
    (
        "nested 1,000 deep in an unknown field",
        variant()[:-1] + b', "zz": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        "too_deep",
        "$",
        "deeper than 64 levels",
    ),
    (
        "nested 1,000 deep in a feature",
        variant().replace(b'"a": 1.5', b'"a": ' + b"[" * 1000 + b"]" * 1000),
        "too_deep",
        "$",
        "deeper than 64 levels",
    ),
    (
        "nested 1,000 deep in the prediction",
        variant(prediction=0.5).replace(b"0.5}", b"[" * 1000 + b"]" * 1000 + b"}"),
        "too_deep",
        "$",
        "deeper than 64 levels",
    ),
    (
        "request id given twice",
        variant()[:-1] + b', "request_id": "r2"}',
        "duplicate_key",
        "$.request_id",
        "more than once",
    ),
    (
        "event time given twice",
        variant()[:-1] + b', "event_time": 99}',
        "duplicate_key",
        "$.event_time",
        "more than once",
    ),
    (
        "feature given twice",
        variant().replace(b'"b": null', b'"b": null, "a": 2.5'),
        "duplicate_key",
        "$.features.a",
        "more than once",
    ),
]


@pytest.mark.parametrize(("case", "raw", "kind", "field", "reason"), CASES, ids=[c[0] for c in CASES])
def test_decoder_names_field_and_reason(case: str, raw: bytes, kind: str, field: str, reason: str) -> None:
    with pytest.raises(EventError) as refused:
        PREDICTION.decode(raw)
    assert refused.value.kind == kind
    assert refused.value.field == field
    assert reason in refused.value.reason


def test_oversized_message_is_refused_before_decoding() -> None:
    codec = Codec(PredictionEvent, max_bytes=1024)
    huge = variant(features={f"f{i}": float(i) for i in range(200)})
    with pytest.raises(EventError) as refused:
        codec.decode(huge)
    assert refused.value.kind == "oversized" and f"{len(huge)} bytes, limit is 1024" in refused.value.reason


def test_tombstone_is_refused() -> None:
    with pytest.raises(EventError, match="tombstone"):
        LABEL.decode(None)


def test_bad_records_go_to_the_dead_letter_topic_with_headers(settings: Settings) -> None:
    small = msgspec.structs.replace(settings, max_event_bytes=4096)
    raws = [raw for _, raw, *_ in CASES] + [variant(features={f"f{i}": 0.5 for i in range(400)})]
    good = variant()
    producer = make_producer(small)
    offsets = [producer.send(small.topic_predictions, key=b"k", value=raw).get(10).offset for raw in raws]
    producer.send(small.topic_predictions, key=b"k", value=good).get(10)
    producer.close()

    report = decode_topics(small, expected=len(raws) + 1, timeout_s=30)
    assert report.decoded["prediction"] == 1
    assert sum(report.dead_letters.values()) == len(raws)

    consumer = make_consumer(small, group_id=None)
    tp = TopicPartition(small.topic_dlq, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    letters = []
    while len(letters) < len(raws):
        for records in consumer.poll(2000).values():
            letters.extend(records)
    consumer.close()
    by_value = {r.value: dict(r.headers) for r in letters}
    assert set(by_value) == set(raws)  # every bad record kept byte for byte
    for raw in raws:
        headers = by_value[raw]
        assert headers[H_SOURCE_TOPIC] == small.topic_predictions.encode()
        assert int(headers[H_SOURCE_OFFSET]) in offsets
        assert headers[H_ERROR_KIND] and headers[H_ERROR_FIELD].startswith(b"$")
    assert by_value[raws[-1]][H_ERROR_KIND] == b"oversized"
