"""The bounded window of chunk records the follower keeps until their manifest comes.

A publisher writes a version's chunks, then its manifest, to one partition.
The follower reads them in that order, so it keeps each chunk of a version
it may still load (:meth:`ChunkWindow.keep`) and hands the manifest's
partition's chunks (:meth:`ChunkWindow.chunks`) to the loader, which then
fetches by offset only those that are not there. Once a manifest is
handled, the chunks before it that no manifest to come needs are forgotten
(:meth:`ChunkWindow.forget`).

**Contract.** The window holds at most ``max_bytes`` of record values. A
chunk is kept only if its version header parses and is above the version
followed, and if it is not larger than the whole window; keeping one more
evicts the oldest first (their manifest, if it comes, fetches them by
offset). A record kept again at the same ``(partition, offset)`` (read a
second time) replaces the first. The window belongs to one thread (the
subscriber's loop): it has no lock.

>>> from collections import namedtuple
>>> Rec = namedtuple("Rec", "partition offset value headers")
>>> def chunk(partition, offset, version, size=4):
...     return Rec(partition, offset, b"x" * size, [("sl-version", str(version).encode())])
>>> w = ChunkWindow(max_bytes=10)
>>> [w.keep(chunk(0, o, 2), followed=1) for o in (0, 1, 2)]   # 12 bytes: the oldest is evicted
[True, True, True]
>>> sorted(w.chunks(0)), w.size
([1, 2], 8)
>>> w.keep(chunk(0, 3, 1), followed=1), w.keep(chunk(0, 4, 3, size=11), followed=1)  # followed; too large
(False, False)
>>> w.keep(chunk(1, 0, 3, size=2), followed=1), sorted(w.chunks(1))
(True, [0])
>>> w.forget(0, before=3, version=2, followed=1), len(w), w.size  # v2's manifest at offset 3 handled
(2, 1, 2)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from ..checkpoint.publish import H_VERSION
from ..checkpoint.reader import record_header

__all__ = ["ChunkRecord", "ChunkWindow", "header_version"]


class ChunkRecord(Protocol):
    """What the window needs of a consumer record."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Sequence[tuple[str, bytes]] | None: ...


def header_version(record: ChunkRecord) -> int | None:
    """The version a record's header claims, or None if none parses (headers are not signed).

    >>> from collections import namedtuple
    >>> Rec = namedtuple("Rec", "partition offset value headers")
    >>> header_version(Rec(0, 0, b"", [(H_VERSION, b"12")])), header_version(Rec(0, 0, b"", []))
    (12, None)
    """
    try:
        return int(record_header(record, H_VERSION) or b"")
    except ValueError:
        return None


def _size(record: ChunkRecord) -> int:
    return len(record.value or b"")


class ChunkWindow:
    """Chunk records by ``(partition, offset)``, with their version, oldest evicted first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # bytes of the values kept
        self._records: OrderedDict[tuple[int, int], tuple[int, ChunkRecord]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def keep(self, record: ChunkRecord, *, followed: int | None) -> bool:
        """Keep a chunk whose version is above ``followed`` (None: any), evicting the oldest as needed.

        False if it is not kept: a version header that does not parse, a
        version not above ``followed``, a record larger than the window.
        """
        version, size = header_version(record), _size(record)
        if version is None or (followed is not None and version <= followed) or size > self.max_bytes:
            return False
        key = (record.partition, record.offset)
        if key in self._records:  # read again (the follower was positioned before it once more)
            self.size -= _size(self._records.pop(key)[1])
        self._records[key] = (version, record)
        self.size += size
        while self.size > self.max_bytes:
            _, (_, old) = self._records.popitem(last=False)
            self.size -= _size(old)
        return True

    def chunks(self, partition: int) -> dict[int, ChunkRecord]:
        """The records kept from ``partition``, by offset (what the loader takes instead of fetching)."""
        return {offset: record for (p, offset), (_, record) in self._records.items() if p == partition}

    def forget(self, partition: int, *, before: int, version: int | None, followed: int | None) -> int:
        """After the manifest of ``version`` at offset ``before`` of ``partition`` was handled (loaded,
        refused or ignored), forget the chunks before it that no manifest to come needs; how many.

        Those of its version (used, or refused with it) and older ones, up to
        ``followed``, go; a newer version's chunks (a publish in progress
        around a replayed manifest) stay.
        """
        limit = max(version or 0, followed or 0)
        gone = [key for key, (v, _) in self._records.items() if key[0] == partition and key[1] < before and v <= limit]
        for key in gone:
            self.size -= _size(self._records.pop(key)[1])
        return len(gone)
