"""Reading records of the model topic: by offset range, and backwards from the end.

:class:`RecordReader` is what every search of the topic reads with (the
checkpoint reader, the start scan, the registry search, the catalog). It
assigns one partition at a time and seeks, so it never fetches a partition
from the beginning, and it gives up at its deadline with
:class:`~stream_learner.checkpoint.errors.ReadTimeoutError`. With a
*prober* (a consumer fetching one batch at a time, :func:`probe`), a record
larger than the consumer's receive limit is skipped and counted
(:class:`Skipped`) instead of stalling the read until its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..bus import RECEIVE_TOO_LARGE, TopicPartition
from .errors import CheckpointError, ReadTimeoutError

#: Backward windows start at one record and double up to this many records
#: (with 512 KiB chunks, at most 32 MiB held at once).
MAX_WINDOW = 64

#: What one record costs a reader besides its value, key and headers (the
#: consumer's objects): empty records are not free.
RECORD_OVERHEAD_BYTES = 64


def record_bytes(record: Any) -> int:
    """What a record costs to hold: value, key, headers and a fixed overhead."""
    headers = sum(len(k) + len(v or b"") for k, v in (record.headers or ()))
    return len(record.value or b"") + len(record.key or b"") + headers + RECORD_OVERHEAD_BYTES


@dataclass
class Skipped:
    """Records a reader could not receive (larger than the client's receive limit) and moved past."""

    count: int = 0
    last: tuple[int, int] | None = None  # (partition, offset)
    seen: set[tuple[int, int]] = field(default_factory=set)

    def add(self, partition: int, offset: int) -> None:
        """Count one record skipped at ``partition``/``offset`` (once: a read retried, or another scan
        passing the same record, skips it again)."""
        if (partition, offset) in self.seen:
            return
        if len(self.seen) < 100_000:
            self.seen.add((partition, offset))
        self.count += 1
        self.last = (partition, offset)


def record_header(record: Any, name: str) -> bytes | None:
    """The value of header ``name`` of a consumed record, or None."""
    for key, value in record.headers or ():
        if key == name:
            found: bytes | None = value
            return found
    return None


#: A read that gets nothing for this long while records are there is stuck on a record larger
#: than the consumer's receive limit (every fetch of it fails): it is probed and moved past.
STALL_S = 2.0


class Overflow(Exception):
    """A bounded read went over its bytes (at ``position``, exclusive)."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


def probe(
    prober: Any, tp: TopicPartition, position: int, hi: int, deadline: float, stall_s: float = STALL_S
) -> tuple[list[Any], int | None]:
    """Read ``tp`` from ``position`` up to ``hi`` one record batch per fetch; the records read,
    and the offset of a record that could not be received (then reading stops there).

    ``prober`` is a consumer made with ``max_partition_fetch_bytes=1``: a
    broker returns the first batch of a fetch whole however large it is,
    and nothing more, so the fetch that fails is the one of the oversized
    record itself, and no record before it is lost.
    """
    prober.assign([tp])
    prober.seek(tp, position)
    out: list[Any] = []
    last_progress = time.monotonic()
    while position < hi:
        now = time.monotonic()
        if now >= deadline:
            raise ReadTimeoutError(f"timed out probing {tp.topic}[{tp.partition}] at offset {position}")
        if now - last_progress >= stall_s:
            return out, position
        try:
            batch = prober.poll(timeout_ms=int(min(deadline - now, 0.5) * 1000) + 1, max_records=1000)
        except RECEIVE_TOO_LARGE:
            return out, position  # this batch alone is larger than the receive limit
        records = [r for r in batch.get(tp, ()) if position <= r.offset < hi]
        if records:
            out.extend(records)
            last_progress = time.monotonic()
        position = max(position, prober.position(tp) or position)
    return out, None


class RecordReader:
    """Reads one topic of ``consumer`` until ``deadline`` (``time.monotonic()``); see the module docstring.

    ``offsets`` (begin, end per partition) bounds the read to offsets the caller already knows, or
    they are asked of the broker for every partition of the topic.
    """

    def __init__(
        self,
        consumer: Any,
        topic: str,
        deadline: float,
        *,
        prober: Any = None,
        skipped: Skipped | None = None,
        offsets: tuple[dict[TopicPartition, int], dict[TopicPartition, int]] | None = None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.deadline = deadline
        self.prober = prober
        self.skipped = skipped if skipped is not None else Skipped()
        if offsets is not None:
            self.begin, self.end = offsets
            self.tps = sorted(self.end, key=lambda tp: tp.partition)
            return
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise CheckpointError(f"topic {topic!r} does not exist or has no partitions")
        self.tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.begin = consumer.beginning_offsets(self.tps)
        self.end = consumer.end_offsets(self.tps)

    def read_range(self, tp: TopicPartition, lo: int, hi: int, max_bytes: int | None = None) -> list[Any]:
        """The records of ``tp`` with ``lo <= offset < hi`` (fewer where the log has gaps).

        With ``max_bytes``, raises :class:`Overflow` as soon as the values read add up to more.
        """
        consumer = self.consumer
        held = 0
        # One partition assigned at a time, so the consumer never fetches
        # (from the beginning) a partition we did not seek.
        consumer.assign([tp])
        consumer.seek(tp, lo)
        out: list[Any] = []
        last_progress = time.monotonic()
        while (position := consumer.position(tp)) < hi:
            now = time.monotonic()
            remaining = self.deadline - now
            if remaining <= 0:
                raise ReadTimeoutError(
                    f"timed out reading {self.topic}[{tp.partition}] offsets {lo}..{hi - 1} (at {position})"
                )
            if self.prober is not None and now - last_progress >= STALL_S:
                # Stuck: a record past the position is too large to receive. Read on one
                # batch at a time, skip the record that cannot be received, go on after it.
                probed, bad = probe(self.prober, tp, position, hi, self.deadline)
                out.extend(probed)
                after = probed[-1].offset + 1 if probed else position
                if bad is not None:
                    self.skipped.add(tp.partition, bad)
                    after = bad + 1
                consumer.seek(tp, after)
                last_progress = time.monotonic()
                continue
            try:
                batch = consumer.poll(timeout_ms=int(min(remaining, 1.0) * 1000) + 1, max_records=max(1, hi - position))
            except RECEIVE_TOO_LARGE:
                if self.prober is None:
                    raise
                last_progress = 0.0  # a response too large to receive: probe at once
                continue
            records = [r for r in batch.get(tp, ()) if lo <= r.offset < hi]
            if records:
                out.extend(records)
                last_progress = time.monotonic()
                if max_bytes is not None:
                    held += sum(len(r.value or b"") for r in records)
                    if held > max_bytes:
                        raise Overflow(records[-1].offset + 1)
        return out

    def newest(self, wanted: Callable[[Any], bool]) -> list[tuple[Any, dict[int, Any]]]:
        """Per partition, the newest record for which ``wanted`` holds, with its window.

        Each partition is read backwards from its end in windows of 1, 2, 4,
        ... records (at most :data:`MAX_WINDOW`), one window per partition
        per round. Once some partition has a hit, the others stop at records
        older than it (by record timestamp): nothing further back is newer.
        """
        cursor = {tp: self.end[tp] for tp in self.tps}
        size = dict.fromkeys(self.tps, 1)
        active = [tp for tp in self.tps if self.end[tp] > self.begin[tp]]
        found: dict[TopicPartition, tuple[Any, dict[int, Any]]] = {}
        while active:
            for tp in list(active):
                hi = cursor[tp]
                lo = max(self.begin[tp], hi - size[tp])
                records = self.read_range(tp, lo, hi)
                cursor[tp], size[tp] = lo, min(size[tp] * 2, MAX_WINDOW)
                window = {r.offset: r for r in records}
                bound = max((r.timestamp for r, _ in found.values()), default=None)
                done = lo <= self.begin[tp]
                for record in reversed(records):
                    if wanted(record):
                        found[tp] = (record, window)
                        done = True
                        break
                    if bound is not None and record.timestamp < bound:
                        done = True
                        break
                if done:
                    active.remove(tp)
        return list(found.values())
