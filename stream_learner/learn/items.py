"""What a learning session learns from: example records, or examples already decoded.

A live trainer hands the session the records it consumed (:class:`Record`, a
kafka-python ``ConsumerRecord`` is one); a replay of the events hands it the
examples its join step emitted. Items read but not learned yet are part of
the session's snapshot (:func:`pack_item`), so a restart learns them next
instead of reading them again.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Protocol

from ..events import EXAMPLE, ExampleEvent, encode


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


#: What a session learns from: records of the examples topic, or examples already decoded (a
#: replay's join step emits those).
Item = Record | ExampleEvent


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def pack_item(item: Item) -> list[Any]:
    """An item not learned yet as the session snapshot keeps it (JSON: bytes as base64)."""
    if isinstance(item, ExampleEvent):
        return ["e", _b64(encode(item))]
    return ["r", item.topic, item.partition, item.offset, _b64(item.key), _b64(item.value)]


def unpack_item(data: list[Any]) -> Item:
    """An item back from :func:`pack_item`."""
    if data[0] == "e":
        return EXAMPLE.decode(_unb64(data[1]) or b"")
    return StoredRecord(str(data[1]), int(data[2]), int(data[3]), _unb64(data[4]), _unb64(data[5]))
