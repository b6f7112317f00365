"""Reading a checkpoint from the model topic: newest first, without reading history.

:func:`read_latest` and :func:`read_version` never read the topic from the
beginning. For each partition they read backwards from the end in windows
that double in size (the last record, then the two before it, ...), reading
only record headers until they meet the manifest they want; then they
fetch exactly the chunks the manifest lists, by offset. Loading the newest
checkpoint of ``C`` chunks typically reads ``C + 1`` records however long
the topic is.

**Checks, in order** (each failure raises, never falls back to an older
checkpoint: the serving side keeps its last good model instead):

1. the newest record claiming to be the wanted manifest (headers) decodes as
   ``manifest.v1`` and agrees with its headers (:class:`CheckpointError`);
2. its Ed25519 signature verifies with a trusted public key
   (:class:`SignatureError`);
3. it lists one offset per chunk, and the record at each offset is a chunk
   of this model, version and digest with the right index
   (:class:`IncompleteCheckpointError`);
4. the reassembled bytes have the size and SHA-256 the manifest states
   (:class:`DigestError`);
5. they are safetensors (:class:`CheckpointError`); never unpickled.

A read the broker does not complete in time raises :class:`ReadTimeoutError`
(a :class:`CheckpointError` too): unlike a failed check, it is worth
retrying as is.

**Several partitions.** Every partition of the topic is searched, in rounds
of one window each. Once a candidate is found, a partition is searched only
back to the candidate's record timestamp (anything older cannot be newer).
Among candidates of different partitions the signed ``created_at`` (then
``version``) decides. The publisher writes a model's chunks and manifest to
one partition; ``chunk_offsets`` are offsets in the manifest's partition.

The consumer is the reader's while it runs: it is assigned one partition at
a time and seeked around; use one without a group (``group_id=None``), as
:func:`make_reader_consumer` builds.

**Following the topic.** A subscriber that reads the topic forward (see
:mod:`stream_learner.serving`) already holds each new manifest record; it
hands it to :func:`load_manifest_record`, which runs checks 1-5 above on
that record and fetches its chunks by offset (or takes them from the
records the subscriber read along the way), never searching the topic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from kafka import KafkaConsumer, TopicPartition

from ..bus import make_consumer
from ..config import Settings
from ..errors import EventError
from ..events import MANIFEST, CheckpointManifest
from .codec import decode_tensors, sha256_hex
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DigestError,
    IncompleteCheckpointError,
)
from .publish import (
    H_CHUNK_COUNT,
    H_CHUNK_INDEX,
    H_MODEL,
    H_SHA256,
    H_TYPE,
    H_VERSION,
    TYPE_CHUNK,
    TYPE_MANIFEST,
)
from .signing import verify_manifest

PublicKeys = Ed25519PublicKey | Iterable[Ed25519PublicKey]

class ReadTimeoutError(CheckpointError):
    """The broker did not deliver the records to read in time: worth retrying, unlike a failed check."""


#: Backward windows start at one record and double up to this many records
#: (with 512 KiB chunks, at most 32 MiB held at once).
MAX_WINDOW = 64


@dataclass(frozen=True, eq=False)  # tensors have no truth value: no ==
class LoadedCheckpoint:
    """A verified checkpoint: its signed manifest and its weights.

    ``partition`` and ``offset`` locate the manifest record, so a subscriber
    can follow the topic from there.
    """

    manifest: CheckpointManifest
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    topic: str
    partition: int
    offset: int


def make_reader_consumer(settings: Settings, **overrides: Any) -> KafkaConsumer:
    """A consumer for the readers: no group, no commits, modest fetch sizes.

    A fetch still returns a record larger than ``max_partition_fetch_bytes``
    (the broker always sends the first batch whole), so this only bounds
    how far past a window the consumer reads ahead.
    """
    opts: dict[str, Any] = {"max_partition_fetch_bytes": 2 * 1024 * 1024, **overrides}
    return make_consumer(settings, None, **opts)


def read_latest(
    source: Settings | KafkaConsumer,
    topic: str,
    public_key: PublicKeys,
    model: str | None = None,
    *,
    timeout_s: float = 60.0,
) -> LoadedCheckpoint:
    """The newest checkpoint of ``model`` (of any model if ``None``), verified and loaded.

    ``source`` is the settings (a consumer is made and closed here) or a
    consumer to reuse (see the module docstring). Raises
    :class:`CheckpointNotFoundError` if the topic holds no manifest for the
    model, and the errors listed in the module docstring.
    """
    return _read(source, topic, public_key, model, None, timeout_s)


def read_version(
    source: Settings | KafkaConsumer,
    topic: str,
    public_key: PublicKeys,
    version: int,
    model: str | None = None,
    *,
    timeout_s: float = 60.0,
) -> LoadedCheckpoint:
    """Checkpoint ``version`` of ``model``, verified and loaded.

    Scans backwards from the end until that version's newest manifest; the
    cost grows with how far back it is. Raises
    :class:`CheckpointNotFoundError` if it is not on the topic (never
    published, or deleted by retention).
    """
    return _read(source, topic, public_key, model, version, timeout_s)


def load_manifest_record(
    consumer: KafkaConsumer,
    record: Any,
    public_key: PublicKeys,
    *,
    window: dict[int, Any] | None = None,
    timeout_s: float = 60.0,
) -> LoadedCheckpoint:
    """Verify the manifest ``record`` already read from the topic, then load its weights.

    ``record`` is a consumer record whose headers say it is a manifest (the
    caller has checked them). The same checks as :func:`read_latest` apply,
    in the same order (see the module docstring). ``window`` maps offsets of
    ``record``'s partition to records already read there: chunks found in
    it are not fetched again (their headers and the digest are checked all
    the same). Missing chunks are read by offset with ``consumer``, which is
    assigned and seeked here (so not a consumer whose position matters).
    Raises :class:`ReadTimeoutError` if the broker does not deliver them
    within ``timeout_s``.
    """
    keys = key_list(public_key)
    reader = _Reader(consumer, record.topic, time.monotonic() + timeout_s)
    candidate = reader.verified(record, window or {}, keys)
    tensors, metadata = reader.weights(candidate)
    return LoadedCheckpoint(
        manifest=candidate.manifest, tensors=tensors, metadata=metadata,
        topic=record.topic, partition=record.partition, offset=record.offset,
    )


def _read(
    source: Settings | KafkaConsumer,
    topic: str,
    public_key: PublicKeys,
    model: str | None,
    version: int | None,
    timeout_s: float,
) -> LoadedCheckpoint:
    keys = key_list(public_key)
    if isinstance(source, Settings):
        consumer = make_reader_consumer(source)
        try:
            return _Reader(consumer, topic, time.monotonic() + timeout_s).load(keys, model, version)
        finally:
            consumer.close()
    return _Reader(source, topic, time.monotonic() + timeout_s).load(keys, model, version)


def record_header(record: Any, name: str) -> bytes | None:
    """The value of header ``name`` of a consumed record, or None."""
    for key, value in record.headers or ():
        if key == name:
            found: bytes | None = value
            return found
    return None


def key_list(public_key: PublicKeys) -> list[Ed25519PublicKey]:
    """One trusted key or several, as a list."""
    return [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)


@dataclass
class _Candidate:
    manifest: CheckpointManifest
    record: Any
    window: dict[int, Any]  # records read along with it, by offset: its chunks are often there


class _Reader:
    def __init__(self, consumer: Any, topic: str, deadline: float) -> None:
        self.consumer = consumer
        self.topic = topic
        self.deadline = deadline
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise CheckpointError(f"topic {topic!r} does not exist or has no partitions")
        self.tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.begin = consumer.beginning_offsets(self.tps)
        self.end = consumer.end_offsets(self.tps)

    # -- reading ---------------------------------------------------------------

    def read_range(self, tp: TopicPartition, lo: int, hi: int) -> list[Any]:
        """The records of ``tp`` with ``lo <= offset < hi`` (fewer where the log has gaps)."""
        consumer = self.consumer
        # One partition assigned at a time, so the consumer never fetches
        # (from the beginning) a partition we did not seek.
        consumer.assign([tp])
        consumer.seek(tp, lo)
        out: list[Any] = []
        while consumer.position(tp) < hi:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise ReadTimeoutError(
                    f"timed out reading {self.topic}[{tp.partition}] offsets {lo}..{hi - 1} "
                    f"(at {consumer.position(tp)})"
                )
            batch = consumer.poll(timeout_ms=int(min(remaining, 1.0) * 1000) + 1,
                                  max_records=max(1, hi - consumer.position(tp)))
            out.extend(r for r in batch.get(tp, ()) if lo <= r.offset < hi)
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

    def load(self, keys: list[Ed25519PublicKey], model: str | None, version: int | None) -> LoadedCheckpoint:
        model_b = model.encode() if model is not None else None
        version_b = str(version).encode() if version is not None else None

        def wanted(record: Any) -> bool:
            return (
                record_header(record, H_TYPE) == TYPE_MANIFEST
                and (model_b is None or record_header(record, H_MODEL) == model_b)
                and (version_b is None or record_header(record, H_VERSION) == version_b)
            )

        hits = self.newest(wanted)
        what = f"model {model!r}" if model is not None else "any model"
        if version is not None:
            what += f" version {version}"
        if not hits:
            raise CheckpointNotFoundError(f"no manifest for {what} on topic {self.topic!r}")
        candidates = [self.verified(record, window, keys) for record, window in hits]
        best = max(candidates, key=lambda c: (c.manifest.created_at, c.manifest.version, -c.record.partition))
        tensors, metadata = self.weights(best)
        return LoadedCheckpoint(
            manifest=best.manifest, tensors=tensors, metadata=metadata,
            topic=self.topic, partition=best.record.partition, offset=best.record.offset,
        )

    def verified(self, record: Any, window: dict[int, Any], keys: list[Ed25519PublicKey]) -> _Candidate:
        where = f"{self.topic}[{record.partition}]@{record.offset}"
        try:
            manifest = MANIFEST.decode(record.value)
        except EventError as exc:
            raise CheckpointError(f"manifest at {where} is invalid: {exc}") from None
        verify_manifest(manifest, keys)
        # Headers are not signed: a record whose headers disagree with its
        # signed manifest was not written by the publisher.
        if (record_header(record, H_MODEL), record_header(record, H_VERSION)) != (
            manifest.model.encode(), str(manifest.version).encode()
        ):
            raise CheckpointError(
                f"manifest at {where} is {manifest.model} v{manifest.version} but its headers say "
                f"{record_header(record, H_MODEL)!r} v{record_header(record, H_VERSION)!r}"
            )
        return _Candidate(manifest, record, window)

    # -- the weights -----------------------------------------------------------

    def weights(self, candidate: _Candidate) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        manifest, record = candidate.manifest, candidate.record
        info = manifest.weights
        what = f"checkpoint {manifest.model} v{manifest.version}"
        tp = TopicPartition(self.topic, record.partition)
        offsets = info.chunk_offsets
        if len(offsets) != info.chunks:
            raise IncompleteCheckpointError(
                f"{what}: manifest lists {len(offsets)} chunk offsets for {info.chunks} chunks"
            )
        needed = set(offsets)
        have = {o: r for o, r in candidate.window.items() if o in needed}
        missing = sorted(needed - set(have))
        low, high = self.begin[tp], record.offset
        for off in missing:
            if not low <= off < high:
                raise IncompleteCheckpointError(
                    f"{what}: chunk offset {off} is outside {self.topic}[{tp.partition}] "
                    f"offsets {low}..{high - 1} (deleted by retention, or never written)"
                )
        # Contiguous offsets are fetched with one seek; a gap means another seek.
        for lo, hi in _runs(missing):
            for rec in self.read_range(tp, lo, hi):
                have[rec.offset] = rec
        expect = {
            H_TYPE: TYPE_CHUNK,
            H_MODEL: manifest.model.encode(),
            H_VERSION: str(manifest.version).encode(),
            H_CHUNK_COUNT: str(info.chunks).encode(),
            H_SHA256: info.sha256.encode(),
        }
        parts: list[bytes] = []
        for index, off in enumerate(offsets):
            chunk = have.get(off)
            if chunk is None:
                raise IncompleteCheckpointError(f"{what}: chunk {index} at offset {off} is missing")
            got = {name: record_header(chunk, name) for name in expect}
            got_index = record_header(chunk, H_CHUNK_INDEX)
            if got != expect or got_index != str(index).encode():
                raise IncompleteCheckpointError(
                    f"{what}: the record at offset {off} is not its chunk {index}: headers "
                    f"{ {k: v for k, v in got.items() if v != expect[k]} } index {got_index!r}"
                )
            parts.append(chunk.value or b"")
        data = b"".join(parts)
        if len(data) != info.size:
            raise DigestError(f"{what}: weights are {len(data)} bytes, the manifest says {info.size}")
        digest = sha256_hex(data)
        if digest != info.sha256:
            raise DigestError(f"{what}: weights sha256 {digest} != manifest's {info.sha256}")
        return decode_tensors(data)


def _runs(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets as half-open ranges of consecutive offsets.

    >>> _runs([3, 4, 5, 9, 11, 12])
    [(3, 6), (9, 10), (11, 13)]
    """
    runs: list[tuple[int, int]] = []
    for off in offsets:
        if runs and runs[-1][1] == off:
            runs[-1] = (runs[-1][0], off + 1)
        else:
            runs.append((off, off + 1))
    return runs
