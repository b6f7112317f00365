"""Range resolution on the real local broker: offsets, edges, and record-timestamp bounds verified
against the records, with the broker's answer ignored where it is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from stream_learner.bus import make_consumer, make_producer
from stream_learner.config import Settings
from stream_learner.events import encode
from stream_learner.replay.ranges import offset_for_time, parse_bound, resolve_ranges

from ..learn.streams import agrawal_examples
from .test_replay import replay

T0 = 1_767_225_600_000
PER_PARTITION = 200


def produce_timed(settings: Settings, topic: str, partitions: int, values: Any = None) -> None:
    """``PER_PARTITION`` records on each partition, record ``i`` stamped ``T0 + 10 * i``."""
    producer = make_producer(settings)
    for i in range(PER_PARTITION):
        for p in range(partitions):
            value = values[i] if values is not None else b"v%d" % i
            producer.send(topic, key=b"k", value=value, partition=p, timestamp_ms=T0 + 10 * i)
    producer.flush()
    producer.close()


def truth(t: int) -> int:
    """The earliest offset whose timestamp is >= ``t``, from how the records were stamped."""
    return min(PER_PARTITION, max(0, -(-(t - T0) // 10)))


class WrongBroker:
    """A consumer whose ``offsets_for_times`` answers wrongly (or fails); everything else is real."""

    def __init__(self, consumer: Any, answer: str) -> None:
        self._consumer = consumer
        self._answer = answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def offsets_for_times(self, timestamps: dict, timeout_ms: int | None = None) -> dict:
        from kafka.errors import UnsupportedVersionError

        if self._answer == "fails":
            raise UnsupportedVersionError("no ListOffsets v1")
        real = self._consumer.offsets_for_times(timestamps, timeout_ms=timeout_ms)
        out = {}
        for tp, t in timestamps.items():
            right = truth(t)
            wrong = {"zero": 0, "one_late": right + 1, "one_early": right - 1, "none": None}[self._answer]
            out[tp] = None if wrong is None else max(0, wrong)
        assert set(real) == set(out)
        return out


@pytest.mark.parametrize("t", [T0 - 5, T0, T0 + 1, T0 + 500, T0 + 505, T0 + 1990, T0 + 1991, T0 + 10**6])
def test_time_bounds_match_the_records_whatever_the_broker_answers(settings: Settings, t: int) -> None:
    produce_timed(settings, settings.topic_predictions, 3)
    consumer = make_consumer(settings, group_id=None)
    try:
        tp = TopicPartition(settings.topic_predictions, 1)
        # The real broker's answer, verified (the local Tansu answers offset 0 for any time: corrected).
        real = offset_for_time(consumer, tp, t, 0, PER_PARTITION)
        assert real.offset == truth(t)
        assert real.verified == (real.broker_offset == truth(t))
        # Deliberately wrong answers, whatever the broker under the test does.
        for answer in ("zero", "one_late", "one_early", "none", "fails"):
            got = offset_for_time(WrongBroker(consumer, answer), tp, t, 0, PER_PARTITION)  # type: ignore[arg-type]
            assert got.offset == truth(t), answer
            if got.broker_offset != truth(t):
                assert not got.verified, answer  # a wrong answer never passes the check
    finally:
        consumer.close()


@pytest.mark.slow
def test_resolve_ranges_by_time_offsets_and_edges(settings: Settings) -> None:
    produce_timed(settings, settings.topic_predictions, 3)
    produce_timed(settings, settings.topic_labels, 3)
    topics = [settings.topic_predictions, settings.topic_labels]
    consumer = make_consumer(settings, group_id=None)
    try:
        by_time = resolve_ranges(consumer, topics, parse_bound(f"t:{T0 + 500}"), parse_bound(f"t:{T0 + 1500}"))
        assert set(by_time.ranges.values()) == {(50, 150)} and len(by_time.ranges) == 6
        assert by_time.total() == 6 * 100
        edges = resolve_ranges(consumer, topics, parse_bound("beginning"), parse_bound("end"))
        assert set(edges.ranges.values()) == {(0, PER_PARTITION)}
        some = resolve_ranges(consumer, topics, parse_bound(f"{settings.topic_labels}:2=30,1=7"), parse_bound("120"))
        assert some.ranges[f"{settings.topic_labels}:2"] == (30, 120)
        assert some.ranges[f"{settings.topic_predictions}:1"] == (7, 120)
        assert some.ranges[f"{settings.topic_predictions}:0"] == (0, 120)
        empty = resolve_ranges(consumer, topics, parse_bound("150"), parse_bound("100"))
        assert empty.total() == 0
    finally:
        consumer.close()


def test_a_replay_by_time_learns_exactly_the_records_in_that_time(rsettings: Settings, tmp_path: Path) -> None:
    import msgspec

    from ..learn.streams import AGRAWAL_FEATURES

    s = msgspec.structs.replace(rsettings, trainer_features=AGRAWAL_FEATURES, trainer_classes=["0", "1"])
    values = [encode(x) for x in agrawal_examples(PER_PARTITION, seed=5)]
    produce_timed(s, s.topic_examples, 1, values)
    _, by_time = replay(
        s,
        "t",
        source="examples",
        start=f"t:{T0 + 300}",
        end="2026-01-01T00:00:01.2Z",
        lineage="m@x",
        output_dir=str(tmp_path / "t"),
    )
    _, by_offset = replay(
        s, "o", source="examples", start="30", end="120", lineage="m@x", output_dir=str(tmp_path / "o")
    )
    assert by_time["ranges"]["ranges"] == {f"{s.topic_examples}:0": [30, 120]}
    assert by_time["counts"]["examples"] == 90
    assert by_time["published"] == by_offset["published"]
