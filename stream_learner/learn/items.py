"""What a learning session learns from: example records, or examples already decoded.

A live trainer hands the session the records it consumed (:class:`Record`, a
kafka-python ``ConsumerRecord`` is one); a replay of the events hands it the
examples its join step emitted. Items read but not learned yet are part of
the session's snapshot (:func:`pack_item`), so a restart learns them next
instead of reading them again.

**One item is one example.** A record of the examples topic in the batch
layout (:mod:`stream_learner.events.batch`) holds many: :func:`expand` turns
it into one :class:`BatchedExample` per example (its record's offset, its
index in the record, the example's own bytes), so chunks count examples
whatever the topic's format, and a refused example is dead-lettered alone. A
batch record that does not parse at all becomes one :class:`CorruptBatch`,
dead-lettered whole. :func:`after` is where reading goes on after an item:
``(offset, index)``, the record to read next and how many of its examples
were read already (0 but inside a batch read in part).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import EventError
from ..events import EXAMPLE, ExampleEvent, encode
from ..events.batch import batch_values, is_batch


class Record(Protocol):
    """What the session needs of a consumed example record (a kafka-python ``ConsumerRecord`` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class StoredRecord:
    """A record read but not learned yet, as it comes back from a snapshot."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class BatchedExample:
    """One example of an example-batch record: the record's topic, partition and offset, the
    example's index in it (``batch_index``, of ``batch_size``) and its own bytes as ``value``.

    A dead letter of it carries ``value`` alone, with ``sl-source-index`` (stream_learner.bus).
    """

    topic: str
    partition: int
    offset: int
    batch_index: int
    batch_size: int
    value: bytes
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class CorruptBatch:
    """A record that says it is an example batch but cannot be split: dead-lettered whole, with ``error``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: EventError


#: What a session learns from: records of the examples topic (one example each, or one of a batch, or a
#: batch that does not parse), or examples already decoded (a replay's join step emits those).
Item = Record | ExampleEvent


def expand(records: Sequence[Any], skip: int = 0) -> list[Any]:
    """The items of ``records`` (one partition's, in offset order): a one-example record as it is, a batch
    record as its examples (:class:`BatchedExample`), or :class:`CorruptBatch` if it does not parse.

    ``skip`` examples of the first record are left out: read before a restart (see :func:`after`).
    """
    out: list[Any] = []
    for n, record in enumerate(records):
        headers = record.headers
        if not (headers and is_batch(headers)):
            out.append(record)
            continue
        topic, partition, offset = record.topic, record.partition, record.offset
        try:
            values = batch_values(record.value)
        except EventError as exc:
            out.append(CorruptBatch(topic, partition, offset, record.key, record.value, exc))
            continue
        size = len(values)
        first = skip if n == 0 else 0
        out.extend(BatchedExample(topic, partition, offset, i, size, values[i], record.key) for i in range(first, size))
    return out


def after(item: Any) -> tuple[int, int]:
    """Where reading goes on after ``item``: ``(record offset, examples of it already read)``.

    >>> after(BatchedExample("t", 0, 7, 1, 3, b"{}")), after(BatchedExample("t", 0, 7, 2, 3, b"{}"))
    ((7, 2), (8, 0))
    """
    if type(item) is BatchedExample and item.batch_index + 1 < item.batch_size:
        return item.offset, item.batch_index + 1
    return item.offset + 1, 0


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def pack_item(item: Item) -> list[Any]:
    """An item not learned yet as the session snapshot keeps it (JSON: bytes as base64)."""
    if isinstance(item, ExampleEvent):
        return ["e", _b64(encode(item))]
    if isinstance(item, BatchedExample):
        t, p, o, i, n = item.topic, item.partition, item.offset, item.batch_index, item.batch_size
        return ["b", t, p, o, i, n, _b64(item.key), _b64(item.value)]
    if isinstance(item, CorruptBatch):
        e, t, p, o = item.error, item.topic, item.partition, item.offset
        return ["c", t, p, o, _b64(item.key), _b64(item.value), e.kind, e.field, e.reason]
    return ["r", item.topic, item.partition, item.offset, _b64(item.key), _b64(item.value)]


def unpack_item(data: list[Any]) -> Item:
    """An item back from :func:`pack_item`."""
    if data[0] == "e":
        return EXAMPLE.decode(_unb64(data[1]) or b"")
    if data[0] == "b":
        t, p, o, i, n = str(data[1]), int(data[2]), int(data[3]), int(data[4]), int(data[5])
        return BatchedExample(t, p, o, i, n, _unb64(data[7]) or b"", _unb64(data[6]))
    if data[0] == "c":
        error = EventError(str(data[6]), str(data[7]), str(data[8]))
        return CorruptBatch(str(data[1]), int(data[2]), int(data[3]), _unb64(data[4]), _unb64(data[5]), error)
    return StoredRecord(str(data[1]), int(data[2]), int(data[3]), _unb64(data[4]), _unb64(data[5]))
