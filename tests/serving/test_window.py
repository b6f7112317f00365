"""ChunkWindow: what the follower keeps of the chunks it reads, and what it forgets (no broker)."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from stream_learner.checkpoint.fetch import record_bytes
from stream_learner.checkpoint.publish import H_CHUNK_COUNT, H_CHUNK_INDEX, H_VERSION
from stream_learner.serving.window import ChunkWindow, header_version


class Record(NamedTuple):
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]]
    key: bytes | None = None


def chunk(
    partition: int, offset: int, version: int | str, size: int = 4, index: bytes = b"0", count: bytes = b"1"
) -> Record:
    return Record(
        partition,
        offset,
        b"x" * size,
        [(H_VERSION, str(version).encode()), (H_CHUNK_INDEX, index), (H_CHUNK_COUNT, count)],
    )


#: What a 4-byte chunk costs the window (value, headers, overhead); its headers add 1 byte per version digit.
UNIT = record_bytes(chunk(0, 0, 2))


def test_the_oldest_chunks_are_evicted_to_stay_within_the_budget() -> None:
    w = ChunkWindow(max_bytes=2 * UNIT + UNIT // 2)
    for offset in range(5):
        assert w.keep(chunk(0, offset, 2), followed=None)
        assert w.size <= w.max_bytes
    assert sorted(w.chunks(0)) == [3, 4] and w.size == 2 * UNIT and len(w) == 2


@pytest.mark.slow
def test_the_window_is_bounded_by_records_too_and_empty_records_are_not_free() -> None:
    w = ChunkWindow(max_bytes=1 << 30, max_records=100)
    for offset in range(200_000):
        w.keep(chunk(0, offset, 2, size=0), followed=None)
    assert len(w) == 100 and sorted(w.chunks(0)) == list(range(199_900, 200_000))
    assert w.size == 100 * record_bytes(chunk(0, 0, 2, size=0)) > 100 * 60


def test_what_is_not_kept() -> None:
    w = ChunkWindow(max_bytes=3 * UNIT)
    assert not w.keep(chunk(0, 0, 3), followed=3)  # not above the followed version
    assert not w.keep(chunk(0, 1, 2), followed=3)
    assert not w.keep(chunk(0, 2, "x"), followed=None)  # a version header that does not parse
    assert not w.keep(Record(0, 3, b"abc", []), followed=None)  # no version header
    assert not w.keep(chunk(0, 4, 4, size=3 * UNIT), followed=3)  # larger than the whole window
    assert not w.keep(chunk(0, 5, 4, index=b"1", count=b"1"), followed=3)  # index beyond its count
    assert not w.keep(chunk(0, 6, 4, index=b"zero"), followed=3)  # an index that does not parse
    assert len(w) == 0 and w.size == 0
    exact = 3 * UNIT - record_bytes(chunk(0, 7, 4, size=0))
    assert w.keep(chunk(0, 7, 4, size=exact), followed=3)  # exactly the window
    assert w.size == w.max_bytes
    assert w.keep(Record(0, 8, None, chunk(0, 8, 4).headers), followed=3)  # an empty value
    assert sorted(w.chunks(0)) == [8]  # the exact one was evicted for it


def test_a_chunk_read_again_replaces_the_first_and_is_counted_once() -> None:
    w = ChunkWindow(max_bytes=2 * UNIT)
    for _ in range(3):
        assert w.keep(chunk(0, 7, 2), followed=None)
    assert len(w) == 1 and w.size == UNIT
    w.keep(chunk(0, 8, 2), followed=None)
    assert sorted(w.chunks(0)) == [7, 8] and w.size == 2 * UNIT


def test_chunks_are_per_partition() -> None:
    w = ChunkWindow(max_bytes=100 * UNIT)
    w.keep(chunk(0, 5, 2), followed=None)
    w.keep(chunk(1, 5, 2, size=2), followed=None)
    assert list(w.chunks(0)) == [5] and w.chunks(0)[5].value == b"xxxx"
    assert w.chunks(1)[5].value == b"xx" and dict(w.chunks(2)) == {}


def test_forget_drops_what_no_manifest_to_come_needs() -> None:
    w = ChunkWindow(max_bytes=100 * UNIT)
    for offset, version in [(0, 1), (1, 2), (2, 2), (3, 3), (5, 2), (6, 4)]:
        w.keep(chunk(0, offset, version), followed=None)
    w.keep(chunk(1, 0, 2), followed=None)
    # v2's manifest at offset 4 of partition 0 handled, v1 followed: v1 and v2 before it go;
    # v3's chunk (a publish in progress), v2's after it and the other partition's stay.
    assert w.forget(0, before=4, version=2, followed=1) == 3
    assert sorted(w.chunks(0)) == [3, 5, 6] and list(w.chunks(1)) == [0] and w.size == 4 * UNIT
    # A manifest whose version header did not parse: up to the followed version.
    assert w.forget(0, before=7, version=None, followed=3) == 2
    assert sorted(w.chunks(0)) == [6] and w.size == 2 * UNIT


def test_prune_drops_the_chunks_of_versions_that_can_no_longer_be_loaded() -> None:
    w = ChunkWindow(max_bytes=100 * UNIT)
    for offset, version in [(0, 2), (1, 3), (2, 5), (3, 9)]:
        w.keep(chunk(offset % 2, offset, version), followed=None)
    assert w.prune(followed=5) == 3
    assert len(w) == 1 and list(w.chunks(1)) == [3] and w.size == UNIT


def test_header_version() -> None:
    assert header_version(chunk(0, 0, 12)) == 12
    assert header_version(chunk(0, 0, "twelve")) is None
    assert header_version(Record(0, 0, b"", [])) is None
