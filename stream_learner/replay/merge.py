"""A bounded read of several partitions, merged in an order that depends on the records only.

:class:`MergedReader` reads every partition of a :class:`~.ranges.Ranges`
from its start to its end offset and yields the records in **merge order**:
each partition's records stay in offset order, and among the partitions'
next records the one with the smallest key ``(time, topic, partition,
offset)`` comes first (a k-way merge; ``time`` is what the caller's
``decode`` says: the event time for predictions and labels, the record
timestamp for examples).

A record is yielded only once every partition that is not finished has a
record waiting, so the order never depends on which partitions a fetch
happened to return, nor on fetch sizes: two reads of the same ranges give
the same sequence. Partitions that run ahead are paused (bounded memory).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..bus import Consumer
from .errors import ReplayError
from .ranges import tp_from_name, tp_name

#: ``decode(record) -> (time, payload)``: the record's merge time and what to yield for it.
Decode = Callable[[Any], "tuple[int, Any]"]


class MergedReader:
    """The records of ``ranges`` (``{"topic:p": (start, end)}``), read from ``positions``, in merge order.

    Iterating yields ``(topic_partition_name, offset, payload)``.
    :attr:`positions` is, per partition, the offset after the last record
    yielded (or dropped), so a reader made again from it continues the very
    same sequence (the merge depends only on the records left).
    ``decode`` runs once per record, in offset order within a partition.
    """

    def __init__(
        self,
        consumer: Consumer,
        ranges: dict[str, tuple[int, int]],
        decode: Decode,
        *,
        positions: dict[str, int] | None = None,
        poll_records: int = 5000,
        max_buffered: int = 20_000,
        stall_timeout_s: float = 60.0,
    ) -> None:
        self.consumer = consumer
        self.decode = decode
        self.poll_records = poll_records
        self.max_buffered = max_buffered
        self.stall_polls = max(1, int(stall_timeout_s / 0.2))
        self.ends = {name: end for name, (_, end) in ranges.items()}
        self.positions = {name: start for name, (start, _) in ranges.items()}
        if positions:
            self.positions.update({k: v for k, v in positions.items() if k in self.positions})
        self.tps = {name: tp_from_name(name) for name in ranges}
        self.buffers: dict[str, deque[tuple[tuple[int, str, int, int], Any]]] = {n: deque() for n in ranges}
        # Partitions with records still to fetch: the next offset to fetch.
        self.fetching = {n: self.positions[n] for n in ranges if self.positions[n] < self.ends[n]}
        self.paused: set[str] = set()
        if self.fetching:
            consumer.assign([self.tps[n] for n in self.fetching])
            for name, offset in self.fetching.items():
                consumer.seek(self.tps[name], offset)

    def read(self) -> Iterator[tuple[str, int, Any]]:
        """Yield every record of the ranges in merge order (see the module docstring)."""
        buffers, positions = self.buffers, self.positions
        active = [n for n in self.tps if buffers[n] or n in self.fetching]
        heap: list[tuple[tuple[int, str, int, int], str]] = []
        while active:
            # The order may only be decided with a record of every live partition in hand.
            missing = [n for n in active if not buffers[n]]
            if missing:
                self._fill(missing)
                active = [n for n in active if buffers[n] or n in self.fetching]
                heap = [(buffers[n][0][0], n) for n in active]
                heapq.heapify(heap)
                continue
            if len(active) == 1:
                # One partition: offset order, no heap.
                name = active[0]
                buf = buffers[name]
                while buf:
                    key, payload = buf.popleft()
                    positions[name] = key[3] + 1
                    yield name, key[3], payload
                if name not in self.fetching:
                    active = []
                continue
            while True:
                _, name = heap[0]
                key, payload = buffers[name].popleft()
                positions[name] = key[3] + 1
                yield name, key[3], payload
                if buffers[name]:
                    heapq.heapreplace(heap, (buffers[name][0][0], name))
                    continue
                heapq.heappop(heap)
                if name in self.fetching:
                    break  # refill before deciding again
                active.remove(name)
                if not active:
                    break

    def _fill(self, missing: list[str]) -> None:
        """Poll until every partition of ``missing`` has a record waiting or is finished."""
        consumer = self.consumer
        # Resume the partitions we wait for; pause those holding plenty (bounded memory).
        for name in list(self.paused):
            if len(self.buffers[name]) < self.max_buffered // 2:
                consumer.resume(self.tps[name])
                self.paused.discard(name)
        empty = 0
        while any(not self.buffers[n] and n in self.fetching for n in missing):
            batch = consumer.poll(timeout_ms=200, max_records=self.poll_records)
            if not batch:
                # A range may end in offsets that hold no record (transaction markers,
                # compacted gaps): the position passes the end without a record to show.
                for name in [n for n in missing if n in self.fetching]:
                    if consumer.position(self.tps[name]) >= self.ends[name]:
                        del self.fetching[name]
                        consumer.pause(self.tps[name])
            empty = 0 if batch else empty + 1
            if empty >= self.stall_polls:
                raise ReplayError(
                    f"no records for {self.stall_polls * 0.2:.0f} s from partitions "
                    f"{[n for n in missing if n in self.fetching]} below their end offsets"
                )
            for tp, records in batch.items():
                name = tp_name(tp)
                if name not in self.fetching:
                    continue
                end = self.ends[name]
                buf = self.buffers[name]
                topic, partition = tp.topic, tp.partition
                for record in records:
                    offset = record.offset
                    if offset >= end:
                        break
                    if offset < self.fetching[name]:
                        continue  # re-fetched after a resume
                    self.fetching[name] = offset + 1
                    decoded = self.decode(record)
                    buf.append(((decoded[0], topic, partition, offset), decoded[1]))
                if consumer.position(tp) >= end or self.fetching[name] >= end:
                    del self.fetching[name]
                    consumer.pause(tp)
                elif len(buf) >= self.max_buffered and name not in missing:
                    consumer.pause(tp)
                    self.paused.add(name)
