"""The example-batch layout (stream_learner.events.batch): round trip, schema, size splitting, refusals,
and the session items a batch record becomes (stream_learner.learn.items). No servers."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from stream_learner.bus import Record, dead_letter_headers, key_partition
from stream_learner.errors import EventError
from stream_learner.events import EXAMPLE, encode
from stream_learner.events.batch import (
    BATCH_HEADERS,
    BATCH_OVERHEAD,
    batch_values,
    encode_batch,
    is_batch,
    record_examples,
    record_values,
    split_batches,
)
from stream_learner.learn.items import BatchedExample, CorruptBatch, after, expand, pack_item, unpack_item
from stream_learner.learn.ranks import pack_records, unpack_records

from .learn.streams import agrawal_examples

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "example-batch.v1.json").read_text())


def record(value: bytes | None, offset: int = 0, headers: list[tuple[str, bytes]] | None = None) -> Record:
    return Record("sl.examples", 0, offset, None, value, list(BATCH_HEADERS if headers is None else headers), 0)


def test_a_batch_holds_the_examples_byte_for_byte_and_validates_against_its_schema() -> None:
    examples = agrawal_examples(50, unlabeled=0.3)
    values = [encode(ex) for ex in examples]
    value = encode_batch(values)
    assert batch_values(value) == values  # no re-encoding either way
    assert record_examples(record(value)) == examples
    jsonschema.Draft202012Validator(SCHEMA).validate(json.loads(value))
    # The JSON format: one example, no header; the same reader.
    assert record_examples(record(values[0], headers=[])) == examples[:1]
    assert not is_batch([]) and is_batch(BATCH_HEADERS)


def test_the_schema_refuses_what_is_no_batch() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    good = json.loads(encode_batch([encode(ex) for ex in agrawal_examples(2)]))
    assert validator.is_valid(good)
    assert not validator.is_valid({**good, "version": 2})
    assert not validator.is_valid({**good, "format": "other"})
    assert not validator.is_valid({**good, "examples": [{"example_id": "x"}]})


def test_split_batches_keeps_order_and_every_record_under_the_limit() -> None:
    values = [encode(ex) for ex in agrawal_examples(1000)]
    limit = 20_000
    batches = split_batches(values, limit)
    assert len(batches) > 1 and all(len(b) <= limit for b in batches)
    assert [v for b in batches for v in batch_values(b)] == values
    # As few records as fit: each (but the last) would pass the limit with the next example in it.
    sizes = [len(batch_values(b)) for b in batches]
    at = 0
    for b, n in zip(batches[:-1], sizes, strict=False):
        at += n
        assert len(b) + 1 + len(values[at]) > limit
    # An example larger than the limit goes alone, whole.
    big = b"x" * 500
    assert split_batches([b"a", big, b"b"], BATCH_OVERHEAD + 100) == [
        encode_batch([b"a"]),
        encode_batch([big]),
        encode_batch([b"b"]),
    ]
    assert split_batches([], 100) == []


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (b'{"format":"stream-learner.example-batch","version":1,"examples":[{"a":', "$"),
        (b"not json", "$"),
        (None, "$"),
        (b'{"format":"stream-learner.example-batch","version":2,"examples":[]}', "$.version"),
        (b'{"format":"other","version":1,"examples":[]}', "$.format"),
        (b'{"format":"stream-learner.example-batch","version":1,"examples":{}}', "$"),
    ],
)
def test_a_batch_that_does_not_parse_is_refused_whole(value: bytes | None, field: str) -> None:
    with pytest.raises(EventError) as refused:
        record_values(record(value))
    assert refused.value.kind == "bad_batch" and refused.value.field == field
    (item,) = expand([record(value, offset=5)])
    assert isinstance(item, CorruptBatch) and item.offset == 5 and item.value == value
    assert item.error.kind == "bad_batch"


def test_one_bad_example_in_a_batch_is_an_item_of_its_own() -> None:
    good = [encode(ex) for ex in agrawal_examples(3)]
    bad = b'{"example_id": 7}'
    items = expand([record(encode_batch([good[0], bad, good[1]]), offset=9)])
    assert [(i.offset, i.batch_index, i.batch_size) for i in items] == [(9, 0, 3), (9, 1, 3), (9, 2, 3)]
    assert items[1].value == bad
    with pytest.raises(EventError):
        EXAMPLE.decode(items[1].value)
    assert EXAMPLE.decode(items[2].value).example_id == agrawal_examples(3)[1].example_id
    # Its dead letter names the record's offset and its index in it.
    headers = dict(dead_letter_headers(EventError("x", "$", "y"), topic="t", partition=0, offset=9, stage="trainer"))
    assert "sl-source-index" not in headers
    headers = dict(
        dead_letter_headers(EventError("x", "$", "y"), topic="t", partition=0, offset=9, stage="trainer", index=1)
    )
    assert headers["sl-source-offset"] == b"9" and headers["sl-source-index"] == b"1"


def test_positions_inside_a_batch_and_a_restart_skipping_what_was_read() -> None:
    values = [encode(ex) for ex in agrawal_examples(4)]
    plain = record(values[0], offset=3, headers=[])
    batch = record(encode_batch(values[1:]), offset=4)
    items = expand([plain, batch])
    assert items[0] is plain
    assert [after(i) for i in items] == [(4, 0), (4, 1), (4, 2), (5, 0)]
    # Resumed at (4, 2): the batch's first two examples were read before.
    resumed = expand([batch], skip=2)
    assert [i.batch_index for i in resumed] == [2] and resumed[0].value == values[3]


def test_items_survive_the_snapshot_and_the_all_gather() -> None:
    values = [encode(ex) for ex in agrawal_examples(2)]
    items = [
        *expand([record(encode_batch(values), offset=1)]),
        *expand([record(b"{", offset=2)]),
    ]

    def key(i: object) -> tuple[object, ...]:  # an EventError equals only itself: compare what it says
        e = getattr(i, "error", None)
        return (i if e is None else (type(i), i.offset, i.value, e.kind, e.field, e.reason),)  # type: ignore[attr-defined]

    assert [key(unpack_item(pack_item(i))) for i in items] == [key(i) for i in items]
    assert [key(i) for i in unpack_records(pack_records(items))] == [key(i) for i in items]
    assert isinstance(items[0], BatchedExample) and isinstance(items[2], CorruptBatch)


def test_a_requests_examples_go_to_the_default_partitioners_partition() -> None:
    from kafka.partitioner.default import DefaultPartitioner

    class Cluster:
        def topics(self) -> set[str]:
            return {"t"}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1, 2, 3, 4}

        def available_partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1, 2, 3, 4}

    cluster = Cluster()
    for i in range(200):
        key = f"req-{i}".encode()
        want = DefaultPartitioner().partition("t", None, key, None, None, cluster)
        assert key_partition(key, {0, 1, 2, 3, 4}) == want
