"""ChunkWindow: what the follower keeps of the chunks it reads, and what it forgets (no broker)."""

from __future__ import annotations

from typing import NamedTuple

from stream_learner.checkpoint.publish import H_VERSION
from stream_learner.serving.window import ChunkWindow, header_version


class Record(NamedTuple):
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]]


def chunk(partition: int, offset: int, version: int | str, size: int = 4) -> Record:
    return Record(partition, offset, b"x" * size, [(H_VERSION, str(version).encode())])


def test_the_oldest_chunks_are_evicted_to_stay_within_the_budget() -> None:
    w = ChunkWindow(max_bytes=10)
    for offset in range(5):
        assert w.keep(chunk(0, offset, 2), followed=None)
        assert w.size <= 10
    assert sorted(w.chunks(0)) == [3, 4] and w.size == 8 and len(w) == 2


def test_what_is_not_kept() -> None:
    w = ChunkWindow(max_bytes=10)
    assert not w.keep(chunk(0, 0, 3), followed=3)  # not above the followed version
    assert not w.keep(chunk(0, 1, 2), followed=3)
    assert not w.keep(chunk(0, 2, "x"), followed=None)  # a version header that does not parse
    assert not w.keep(Record(0, 3, b"abc", []), followed=None)  # no version header
    assert not w.keep(chunk(0, 4, 4, size=11), followed=3)  # larger than the whole window
    assert len(w) == 0 and w.size == 0
    assert w.keep(chunk(0, 5, 4, size=10), followed=3)  # exactly the window
    assert w.keep(Record(0, 6, None, [(H_VERSION, b"4")]), followed=3)  # an empty value
    assert sorted(w.chunks(0)) == [5, 6] and w.size == 10


def test_a_chunk_read_again_replaces_the_first_and_is_counted_once() -> None:
    w = ChunkWindow(max_bytes=10)
    for _ in range(3):
        assert w.keep(chunk(0, 7, 2), followed=None)
    assert len(w) == 1 and w.size == 4
    w.keep(chunk(0, 8, 2, size=6), followed=None)
    assert sorted(w.chunks(0)) == [7, 8] and w.size == 10


def test_chunks_are_per_partition() -> None:
    w = ChunkWindow(max_bytes=100)
    w.keep(chunk(0, 5, 2), followed=None)
    w.keep(chunk(1, 5, 2, size=2), followed=None)
    assert list(w.chunks(0)) == [5] and w.chunks(0)[5].value == b"xxxx"
    assert w.chunks(1)[5].value == b"xx" and w.chunks(2) == {}


def test_forget_drops_what_no_manifest_to_come_needs() -> None:
    w = ChunkWindow(max_bytes=100)
    for offset, version in [(0, 1), (1, 2), (2, 2), (3, 3), (5, 2), (6, 4)]:
        w.keep(chunk(0, offset, version), followed=None)
    w.keep(chunk(1, 0, 2), followed=None)
    # v2's manifest at offset 4 of partition 0 handled, v1 followed: v1 and v2 before it go;
    # v3's chunk (a publish in progress), v2's after it and the other partition's stay.
    assert w.forget(0, before=4, version=2, followed=1) == 3
    assert sorted(w.chunks(0)) == [3, 5, 6] and list(w.chunks(1)) == [0] and w.size == 16
    # A manifest whose version header did not parse: up to the followed version.
    assert w.forget(0, before=7, version=None, followed=3) == 2
    assert sorted(w.chunks(0)) == [6] and w.size == 8


def test_header_version() -> None:
    assert header_version(chunk(0, 0, 12)) == 12
    assert header_version(chunk(0, 0, "twelve")) is None
    assert header_version(Record(0, 0, b"", [])) is None
