"""Closed ranges of topic partitions: by offsets or by record timestamp, verified.

A range is, per partition, the half-open offset interval ``[start, end)``.
A bound is given as text (:func:`parse_bound`):

* ``beginning`` / ``end`` — the partition's first offset / its end offset
  (the high-water mark when the replay starts; recorded, so a resumed replay
  keeps the same end);
* an integer — that offset on every partition;
* ``P=O,...`` or ``TOPIC:P=O,...`` — offsets per partition (unnamed
  partitions: their beginning for a start bound, their end for an end bound);
* ``t:MS`` (milliseconds since the epoch) or an ISO-8601 time with a zone
  (``2026-11-29T10:00:00Z``) — a record timestamp: the bound is the earliest
  offset whose record timestamp is >= that time, Kafka's definition of
  ``offsets_for_times``.

**Time bounds are verified.** The broker's ``offsets_for_times`` answer is
checked against the records themselves: the record at the answer must have a
timestamp >= the time and the record just before it a timestamp < the time.
A correct broker's answer always passes (it is the *earliest* such offset).
If the answer fails, or the broker cannot answer, the offset is found by
reading the partition's timestamps from its beginning, which is exact but
costs a scan; the resolution records which partitions were corrected.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import structlog

from ..bus import KAFKA_ERRORS, Consumer, TopicPartition
from ..errors import ConfigError
from .errors import ReplayError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Bound:
    """One end of a range: an edge, offsets, or a record timestamp (see the module docstring)."""

    kind: Literal["edge", "offset", "offsets", "time"]
    offset: int = 0
    offsets: dict[tuple[str | None, int], int] = field(default_factory=dict)
    time_ms: int = 0


_PART = re.compile(r"^(?:(?P<topic>[A-Za-z0-9._-]+):)?(?P<partition>\d+)=(?P<offset>\d+)$")


def parse_bound(text: str) -> Bound:
    """The bound ``text`` describes.

    >>> parse_bound("beginning").kind, parse_bound("42").offset, parse_bound("t:1767225600000").time_ms
    ('edge', 42, 1767225600000)
    >>> parse_bound("2026-01-01T00:00:00Z").time_ms
    1767225600000
    >>> parse_bound("sl.labels:0=10,1=20").offsets
    {('sl.labels', 0): 10, (None, 1): 20}
    """
    text = text.strip()
    if text in ("beginning", "end"):
        return Bound("edge")
    if text.isdigit():
        return Bound("offset", offset=int(text))
    if text.startswith("t:") and text[2:].isdigit():
        return Bound("time", time_ms=int(text[2:]))
    if "=" in text:
        offsets: dict[tuple[str | None, int], int] = {}
        for part in text.split(","):
            m = _PART.match(part.strip())
            if m is None:
                raise ConfigError(f"invalid offsets bound {text!r}: use P=O or TOPIC:P=O, comma-separated")
            offsets[(m["topic"], int(m["partition"]))] = int(m["offset"])
        return Bound("offsets", offsets=offsets)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"invalid range bound {text!r}: use beginning, end, an offset, P=O,..., "
            "t:<ms> or an ISO-8601 time with a zone"
        ) from None
    if moment.tzinfo is None:
        raise ConfigError(f"time bound {text!r} has no time zone (add Z or +HH:MM)")
    return Bound("time", time_ms=int(moment.timestamp() * 1000))


def tp_name(tp: TopicPartition) -> str:
    """``topic:partition``, the key ranges and positions are stored under."""
    return f"{tp.topic}:{tp.partition}"


def tp_from_name(name: str) -> TopicPartition:
    """The inverse of :func:`tp_name`."""
    topic, _, partition = name.rpartition(":")
    return TopicPartition(topic, int(partition))


@dataclass
class TimeAnswer:
    """How one time bound of one partition was resolved (for the report)."""

    time_ms: int
    offset: int
    broker_offset: int | None  # None: the broker could not answer
    verified: bool  # the broker's answer passed the check against the records


@dataclass
class Ranges:
    """The resolved range of every partition: ``{"topic:p": (start, end)}``, and how times were resolved."""

    ranges: dict[str, tuple[int, int]]
    times: dict[str, dict[str, Any]] = field(default_factory=dict)

    def total(self) -> int:
        """Offsets in the ranges (records, give or take transaction markers)."""
        return sum(end - start for start, end in self.ranges.values())

    def to_json(self) -> dict[str, Any]:
        return {"ranges": {k: list(v) for k, v in self.ranges.items()}, "times": self.times}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ranges:
        return cls({k: (int(v[0]), int(v[1])) for k, v in data["ranges"].items()}, data.get("times", {}))


def resolve_ranges(consumer: Consumer, topics: list[str], start: Bound, end: Bound) -> Ranges:
    """Resolve ``[start, end)`` on every partition of ``topics`` (see the module docstring).

    ``consumer`` has no group; it is reassigned here (give it one of its own).
    A start past the end gives an empty range (start = end).
    """
    tps = []
    for topic in topics:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ConfigError(f"topic {topic!r} does not exist or has no partitions")
        tps += [TopicPartition(topic, p) for p in sorted(partitions)]
    begin = consumer.beginning_offsets(tps)
    stop = end_offsets(consumer, tps)
    out = Ranges({})
    for tp in tps:
        lo, hi = begin[tp], stop[tp]
        s, s_time = _resolve(consumer, tp, start, lo, hi, lo)
        e, e_time = _resolve(consumer, tp, end, lo, hi, hi)
        out.ranges[tp_name(tp)] = (s, max(s, e))
        if s_time or e_time:
            out.times[tp_name(tp)] = {k: v.__dict__ for k, v in (("from", s_time), ("to", e_time)) if v}
    return out


def end_offsets(consumer: Consumer, tps: list[TopicPartition], timeout_s: float = 30.0) -> dict[TopicPartition, int]:
    """The end offset of every partition: the broker's ``ListOffsets`` answer, checked against a fetch.

    A fetch response carries the partition's high-water mark, which is what a
    consumer reads up to; where the two disagree (a broker whose
    ``ListOffsets`` lags, as the local Tansu's does after batched produces),
    the larger wins, so the range never stops short of records already
    written. On Apache Kafka the two agree.
    """
    listed = consumer.end_offsets(tps)
    consumer.assign(tps)
    for tp in tps:
        # Just before the end: the fetch returns at most a record or two, and the mark.
        consumer.seek(tp, max(0, listed[tp] - 1))
    deadline = time.monotonic() + timeout_s
    while any(consumer.highwater(tp) is None for tp in tps):
        if time.monotonic() > deadline:
            raise ReplayError(
                "no fetch response with a high-water mark within "
                f"{timeout_s:.0f} s for {[tp_name(tp) for tp in tps if consumer.highwater(tp) is None]}"
            )
        consumer.poll(timeout_ms=100, max_records=1)
    out = {}
    for tp in tps:
        mark = int(consumer.highwater(tp) or 0)  # known: the loop above waited for it
        if mark != listed[tp]:
            log.warning("replay_end_offset_disagrees", partition=tp_name(tp), list_offsets=listed[tp], highwater=mark)
        out[tp] = max(mark, listed[tp])
    return out


def _resolve(
    consumer: Consumer, tp: TopicPartition, bound: Bound, lo: int, hi: int, edge: int
) -> tuple[int, TimeAnswer | None]:
    if bound.kind == "edge":
        return edge, None
    if bound.kind == "offset":
        return min(max(bound.offset, lo), hi), None
    if bound.kind == "offsets":
        value = bound.offsets.get((tp.topic, tp.partition), bound.offsets.get((None, tp.partition)))
        return (edge if value is None else min(max(value, lo), hi)), None
    answer = offset_for_time(consumer, tp, bound.time_ms, lo, hi)
    return answer.offset, answer


def offset_for_time(consumer: Consumer, tp: TopicPartition, time_ms: int, lo: int, hi: int) -> TimeAnswer:
    """The earliest offset in ``[lo, hi)`` whose record timestamp is >= ``time_ms`` (``hi`` if none).

    Asks the broker (``offsets_for_times``), verifies its answer against the
    records, and scans the partition only if the answer is wrong or missing.
    """
    broker: int | None
    try:
        answer = consumer.offsets_for_times({tp: time_ms}, timeout_ms=30_000).get(tp)
        # None: no record with a timestamp >= time_ms (or no timestamps): the end.
        broker = hi if answer is None else int(answer)
    except (*KAFKA_ERRORS, ValueError) as exc:  # type: ignore[misc]
        log.warning("replay_offsets_for_times_failed", partition=tp_name(tp), error=str(exc))
        broker = None
    if broker is not None and _consistent(consumer, tp, time_ms, broker, lo, hi):
        return TimeAnswer(time_ms, broker, broker, True)
    found = _scan(consumer, tp, time_ms, lo, hi)
    log.warning(
        "replay_broker_time_answer_corrected",
        partition=tp_name(tp),
        time_ms=time_ms,
        broker_offset=broker,
        offset=found,
    )
    return TimeAnswer(time_ms, found, broker, False)


def _records_from(consumer: Consumer, tp: TopicPartition, offset: int, hi: int, limit: int) -> list[Any]:
    """Up to ``limit`` records of ``tp`` from ``offset`` (stopping before ``hi``)."""
    consumer.assign([tp])
    consumer.seek(tp, offset)
    out: list[Any] = []
    empty = 0
    while len(out) < limit and consumer.position(tp) < hi and empty < 50:
        batch = consumer.poll(timeout_ms=200, max_records=limit - len(out)).get(tp, [])
        empty = 0 if batch else empty + 1
        out += [r for r in batch if r.offset < hi]
    if len(out) < limit and consumer.position(tp) < hi:
        raise ReplayError(f"{tp_name(tp)}: no records from offset {offset} for 10 s (below the end {hi})")
    return out


def _consistent(consumer: Consumer, tp: TopicPartition, time_ms: int, offset: int, lo: int, hi: int) -> bool:
    """Whether ``offset`` can be the earliest offset with a timestamp >= ``time_ms``, judged by its neighbours."""
    if not lo <= offset <= hi:
        return False
    if offset < hi:
        at = _records_from(consumer, tp, offset, hi, 1)
        if at and at[0].timestamp < time_ms:
            return False
    if offset > lo:
        # The last record before ``offset`` (a few back: transaction markers leave gaps).
        before = [r for r in _records_from(consumer, tp, max(lo, offset - 16), hi, 16) if r.offset < offset]
        if before and before[-1].timestamp >= time_ms:
            return False
    return True


def _scan(consumer: Consumer, tp: TopicPartition, time_ms: int, lo: int, hi: int) -> int:
    """Read ``tp`` from ``lo``: the first offset with a timestamp >= ``time_ms``, else ``hi``."""
    consumer.assign([tp])
    consumer.seek(tp, lo)
    empty = 0
    while consumer.position(tp) < hi and empty < 50:
        batch = consumer.poll(timeout_ms=200).get(tp, [])
        empty = 0 if batch else empty + 1
        for record in batch:
            if record.offset >= hi:
                return hi
            if record.timestamp >= time_ms:
                return int(record.offset)
    if consumer.position(tp) < hi:
        raise ReplayError(f"{tp_name(tp)}: stuck below the end {hi} while scanning timestamps")
    return hi
