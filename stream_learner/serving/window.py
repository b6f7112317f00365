"""The bounded window of chunk records the follower keeps until their manifest comes.

A publisher writes a version's chunks, then its manifest, to one partition.
The follower reads them in that order, so it keeps each chunk of a version
it may still load (:meth:`ChunkWindow.keep`) and hands the manifest's
partition's chunks (:meth:`ChunkWindow.chunks`) to the loader, which then
fetches by offset only those that are not there. Once a manifest is
handled, the chunks before it that no manifest to come needs are forgotten
(:meth:`ChunkWindow.forget`).

**Contract.** The window holds at most ``max_records`` records and
``max_bytes`` of them, each counted with its key, headers and a fixed
overhead (:func:`~stream_learner.checkpoint.fetch.record_bytes`), so
empty records are not free. A chunk is kept only if its version header
parses and is above the version followed, its index and count headers
parse with ``index < count``, and it is not larger than the whole window;
keeping one more evicts the oldest first (their manifest, if it comes,
fetches them by offset). When a newer version is followed,
:meth:`ChunkWindow.prune` drops every chunk of a version not above it:
those can no longer be loaded. A record kept again at the same
``(partition, offset)`` (read a second time) replaces the first. Lookups
are by partition and offset, never a walk of the whole window. The window
belongs to one thread (the subscriber's loop): it has no lock.

>>> from collections import namedtuple
>>> Rec = namedtuple("Rec", "partition offset key value headers")
>>> def chunk(partition, offset, version, size=4):
...     headers = [("sl-version", str(version).encode()), ("sl-chunk-index", b"0"), ("sl-chunk-count", b"1")]
...     return Rec(partition, offset, None, b"x" * size, headers)
>>> w = ChunkWindow(max_bytes=3 * (4 + 66 + 64), max_records=2)
>>> [w.keep(chunk(0, o, 2), followed=1) for o in (0, 1, 2)]   # 3 records: the oldest is evicted
[True, True, True]
>>> sorted(w.chunks(0)), len(w)
([1, 2], 2)
>>> w.keep(chunk(0, 3, 1), followed=1), w.keep(chunk(0, 4, 3, size=1000), followed=1)  # followed; too large
(False, False)
>>> w.keep(chunk(1, 0, 3, size=2), followed=1), sorted(w.chunks(1))
(True, [0])
>>> w.forget(0, before=3, version=2, followed=1), len(w)  # v2's manifest at offset 3 handled
(1, 1)
>>> w.prune(followed=3), len(w)  # v3 followed: its chunks and older can never be loaded
(1, 0)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from ..checkpoint.fetch import record_bytes, record_header
from ..checkpoint.publish import H_CHUNK_COUNT, H_CHUNK_INDEX, H_VERSION

__all__ = ["ChunkRecord", "ChunkWindow", "header_version"]


class ChunkRecord(Protocol):
    """What the window needs of a consumer record."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Sequence[tuple[str, bytes]] | None: ...


def header_version(record: ChunkRecord) -> int | None:
    """The version a record's header claims, or None if none parses (headers are not signed).

    >>> from collections import namedtuple
    >>> Rec = namedtuple("Rec", "partition offset key value headers")
    >>> header_version(Rec(0, 0, None, b"", [(H_VERSION, b"12")])), header_version(Rec(0, 0, None, b"", []))
    (12, None)
    """
    try:
        return int(record_header(record, H_VERSION) or b"")
    except ValueError:
        return None


def _index_ok(record: ChunkRecord) -> bool:
    try:
        index = int(record_header(record, H_CHUNK_INDEX) or b"")
        count = int(record_header(record, H_CHUNK_COUNT) or b"")
    except ValueError:
        return False
    return 0 <= index < count


class ChunkWindow:
    """Chunk records by ``(partition, offset)``, with their version, oldest evicted first."""

    def __init__(self, max_bytes: int, max_records: int = 4096) -> None:
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.size = 0  # bytes of the records kept (record_bytes)
        self._order: OrderedDict[tuple[int, int], int] = OrderedDict()  # -> bytes, oldest first
        self._by_partition: dict[int, dict[int, tuple[int, ChunkRecord]]] = {}

    def __len__(self) -> int:
        return len(self._order)

    def _drop(self, key: tuple[int, int]) -> None:
        self.size -= self._order.pop(key)
        records = self._by_partition[key[0]]
        del records[key[1]]
        if not records:
            del self._by_partition[key[0]]

    def keep(self, record: ChunkRecord, *, followed: int | None) -> bool:
        """Keep a chunk whose version is above ``followed`` (None: any), evicting the oldest as needed.

        False if it is not kept: a version header that does not parse, a
        version not above ``followed``, index and count headers that do not
        parse or disagree, a record larger than the window.
        """
        version, size = header_version(record), record_bytes(record)
        if version is None or (followed is not None and version <= followed) or size > self.max_bytes:
            return False
        if not _index_ok(record):
            return False
        key = (record.partition, record.offset)
        if key in self._order:  # read again (the follower was positioned before it once more)
            self._drop(key)
        self._order[key] = size
        self._by_partition.setdefault(record.partition, {})[record.offset] = (version, record)
        self.size += size
        while self.size > self.max_bytes or len(self._order) > self.max_records:
            self._drop(next(iter(self._order)))
        return True

    def chunks(self, partition: int) -> Mapping[int, ChunkRecord]:
        """The records kept from ``partition``, by offset (what the loader takes instead of fetching);
        a read-only view, looked up by offset."""
        return _Records(self._by_partition.get(partition, {}))

    def forget(self, partition: int, *, before: int, version: int | None, followed: int | None) -> int:
        """After the manifest of ``version`` at offset ``before`` of ``partition`` was handled (loaded,
        refused or ignored), forget the chunks before it that no manifest to come needs; how many.

        Those of its version (used, or refused with it) and older ones, up to
        ``followed``, go; a newer version's chunks (a publish in progress
        around a replayed manifest) stay.
        """
        limit = max(version or 0, followed or 0)
        records = self._by_partition.get(partition, {})
        gone = [(partition, o) for o, (v, _) in records.items() if o < before and v <= limit]
        for key in gone:
            self._drop(key)
        return len(gone)

    def prune(self, *, followed: int) -> int:
        """Drop every chunk of a version not above ``followed`` (none can be loaded any more); how many."""
        gone = [(p, o) for p, records in self._by_partition.items() for o, (v, _) in records.items() if v <= followed]
        for key in gone:
            self._drop(key)
        return len(gone)


class _Records(Mapping[int, ChunkRecord]):
    """One partition's kept records by offset, read-only."""

    def __init__(self, records: dict[int, tuple[int, ChunkRecord]]) -> None:
        self._records = records

    def __getitem__(self, offset: int) -> ChunkRecord:
        return self._records[offset][1]

    def __contains__(self, offset: object) -> bool:
        return offset in self._records

    def __iter__(self) -> Iterator[int]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)
