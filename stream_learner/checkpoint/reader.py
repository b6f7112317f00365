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

**Limits.** With :class:`LoadLimits` (what serving nodes pass), a
checkpoint is bounded before its memory is spent: the declared size, the
chunks as they arrive, the safetensors header length and tensor count
(:class:`~stream_learner.checkpoint.errors.LimitError`). With a *prober*
(a consumer fetching one batch at a time, :func:`probe`), a record larger
than the consumer's receive limit is skipped and counted instead of
stalling the read until its deadline.

**Where a serving node starts** is another search
(:mod:`stream_learner.checkpoint.scan`), for a topic whose end may hold
anything a writer without the key appended. :func:`read_latest` keeps its
own rule (the newest manifest record is authoritative, never a fallback):
a tool's or a test's precise answer about what is at the end of the topic.

**Following the topic.** A subscriber that reads the topic forward (see
:mod:`stream_learner.serving`) already holds each new manifest record; it
hands it to :func:`load_manifest_record`, which runs checks 1-5 above on
that record and fetches its chunks by offset (or takes them from the
records the subscriber read along the way), never searching the topic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import InvalidReceiveError

from ..bus import make_consumer
from ..config import Settings
from ..errors import EventError
from ..events import MANIFEST, CheckpointManifest
from .codec import MAX_HEADER_BYTES, decode_tensors, header_length, sha256_hex
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DigestError,
    IncompleteCheckpointError,
    LimitError,
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

#: What one record costs a reader besides its value, key and headers (the
#: consumer's objects): empty records are not free.
RECORD_OVERHEAD_BYTES = 64


def record_bytes(record: Any) -> int:
    """What a record costs to hold: value, key, headers and a fixed overhead."""
    headers = sum(len(k) + len(v or b"") for k, v in (record.headers or ()))
    return len(record.value or b"") + len(record.key or b"") + headers + RECORD_OVERHEAD_BYTES


@dataclass(frozen=True)
class LoadLimits:
    """What one checkpoint may ask of a reader, checked before the memory is spent.

    ``max_bytes`` bounds the weights the manifest declares (checked before a
    chunk is fetched) and what its chunks add up to (checked as they
    arrive); ``max_header_bytes`` and ``max_tensors`` bound the safetensors
    header (checked on the first chunk's first 8 bytes, then before it is
    parsed). ``None`` (the trainer's own reads): only the format's limits.
    """

    max_bytes: int = 1 << 30
    max_header_bytes: int = 1 << 20
    max_tensors: int = 1024


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
    limits: LoadLimits | None = None,
) -> LoadedCheckpoint:
    """The newest checkpoint of ``model`` (of any model if ``None``), verified and loaded.

    ``source`` is the settings (a consumer is made and closed here) or a
    consumer to reuse (see the module docstring). Raises
    :class:`CheckpointNotFoundError` if the topic holds no manifest for the
    model, and the errors listed in the module docstring.
    """
    return _read(source, topic, public_key, model, None, timeout_s, limits)


def read_version(
    source: Settings | KafkaConsumer,
    topic: str,
    public_key: PublicKeys,
    version: int,
    model: str | None = None,
    *,
    timeout_s: float = 60.0,
    limits: LoadLimits | None = None,
) -> LoadedCheckpoint:
    """Checkpoint ``version`` of ``model``, verified and loaded (``limits``: see :class:`LoadLimits`).

    Scans backwards from the end until that version's newest manifest; the
    cost grows with how far back it is. Raises
    :class:`CheckpointNotFoundError` if it is not on the topic (never
    published, or deleted by retention).
    """
    return _read(source, topic, public_key, model, version, timeout_s, limits)


def load_manifest_record(
    consumer: KafkaConsumer,
    record: Any,
    public_key: PublicKeys,
    *,
    window: Mapping[int, Any] | None = None,
    timeout_s: float = 60.0,
    limits: LoadLimits | None = None,
    prober: Any = None,
    skipped: Skipped | None = None,
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
    within ``timeout_s``. ``limits`` bounds what the checkpoint may cost
    (:class:`LoadLimits`, :class:`~stream_learner.checkpoint.errors.LimitError`);
    with a ``prober`` (see :func:`probe`), a chunk larger than the
    consumer's receive limit is skipped (counted in ``skipped``) and the
    checkpoint refused as incomplete instead of timing out.
    """
    keys = key_list(public_key)
    reader = _Reader(consumer, record.topic, time.monotonic() + timeout_s, prober=prober, skipped=skipped)
    candidate = reader.verified(record, window or {}, keys)
    tensors, metadata = reader.weights(candidate, limits)
    return LoadedCheckpoint(
        manifest=candidate.manifest,
        tensors=tensors,
        metadata=metadata,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )


def _read(
    source: Settings | KafkaConsumer,
    topic: str,
    public_key: PublicKeys,
    model: str | None,
    version: int | None,
    timeout_s: float,
    limits: LoadLimits | None = None,
) -> LoadedCheckpoint:
    keys = key_list(public_key)
    if isinstance(source, Settings):
        consumer = make_reader_consumer(source)
        try:
            return _Reader(consumer, topic, time.monotonic() + timeout_s).load(keys, model, version, limits)
        finally:
            consumer.close()
    return _Reader(source, topic, time.monotonic() + timeout_s).load(keys, model, version, limits)


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


#: A read that gets nothing for this long while records are there is stuck on a record larger
#: than the consumer's receive limit (every fetch of it fails): it is probed and moved past.
STALL_S = 2.0


class _Overflow(Exception):
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
        except InvalidReceiveError:
            return out, position  # this batch alone is larger than the receive limit
        records = [r for r in batch.get(tp, ()) if position <= r.offset < hi]
        if records:
            out.extend(records)
            last_progress = time.monotonic()
        position = max(position, prober.position(tp) or position)
    return out, None


@dataclass
class _Candidate:
    manifest: CheckpointManifest
    record: Any
    window: Mapping[int, Any]  # records read along with it, by offset: its chunks are often there


class _Reader:
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

    # -- reading ---------------------------------------------------------------

    def read_range(self, tp: TopicPartition, lo: int, hi: int, max_bytes: int | None = None) -> list[Any]:
        """The records of ``tp`` with ``lo <= offset < hi`` (fewer where the log has gaps).

        With ``max_bytes``, raises :class:`_Overflow` as soon as the values read add up to more.
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
            except InvalidReceiveError:
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
                        raise _Overflow(records[-1].offset + 1)
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

    def load(
        self, keys: list[Ed25519PublicKey], model: str | None, version: int | None, limits: LoadLimits | None = None
    ) -> LoadedCheckpoint:
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
        tensors, metadata = self.weights(best, limits)
        return LoadedCheckpoint(
            manifest=best.manifest,
            tensors=tensors,
            metadata=metadata,
            topic=self.topic,
            partition=best.record.partition,
            offset=best.record.offset,
        )

    def verified(self, record: Any, window: Mapping[int, Any], keys: list[Ed25519PublicKey]) -> _Candidate:
        return verify_record(self.topic, record, window, keys)

    # -- the weights -----------------------------------------------------------

    def weights(
        self, candidate: _Candidate, limits: LoadLimits | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        manifest, record = candidate.manifest, candidate.record
        info = manifest.weights
        what = f"checkpoint {manifest.model} v{manifest.version}"
        tp = TopicPartition(self.topic, record.partition)
        offsets = info.chunk_offsets
        if len(offsets) != info.chunks:
            raise IncompleteCheckpointError(
                f"{what}: manifest lists {len(offsets)} chunk offsets for {info.chunks} chunks"
            )
        # Bounded before anything is fetched: the declared size, and chunks of at least a byte.
        if limits is not None and info.size > limits.max_bytes:
            raise LimitError(
                f"{what}: the manifest declares {info.size} bytes of weights, the limit is {limits.max_bytes}"
            )
        if info.chunks > max(1, info.size):
            raise IncompleteCheckpointError(f"{what}: {info.chunks} chunks for {info.size} bytes")
        needed = set(offsets)
        window = candidate.window
        # Looked up by the offsets needed, not by walking the window (the follower's may be large).
        have = {o: window[o] for o in needed if o in window}
        missing = sorted(needed - set(have))
        low, high = self.begin[tp], record.offset
        for off in missing:
            if not low <= off < high:
                raise IncompleteCheckpointError(
                    f"{what}: chunk offset {off} is outside {self.topic}[{tp.partition}] "
                    f"offsets {low}..{high - 1} (deleted by retention, or never written)"
                )
        max_header = limits.max_header_bytes if limits is not None else MAX_HEADER_BYTES
        if limits is not None and offsets:
            # The safetensors header length is in chunk 0's first 8 bytes: a header over the limit
            # is refused before the other chunks are fetched.
            first = offsets[0]
            if first not in have and low <= first < high:
                for rec in self.read_range(tp, first, first + 1):
                    have[rec.offset] = rec
                missing = [o for o in missing if o not in have]
            chunk0 = have.get(first)
            if chunk0 is not None and chunk0.value and len(chunk0.value) >= 8:
                header_length(chunk0.value[:8], max_header)
        # Contiguous offsets are fetched with one seek; a gap means another seek. What the
        # chunks add up to is checked as they arrive: never more than the declared size is held.
        held = sum(len(r.value or b"") for r in have.values())
        for lo, hi in _runs(missing):
            try:
                records = self.read_range(tp, lo, hi, max_bytes=info.size - held)
            except _Overflow:
                raise DigestError(
                    f"{what}: its chunks hold more than the {info.size} bytes the manifest says"
                ) from None
            for rec in records:
                have[rec.offset] = rec
                held += len(rec.value or b"")
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
        total = sum(len(p) for p in parts)
        if total != info.size:
            raise DigestError(f"{what}: weights are {total} bytes, the manifest says {info.size}")
        if parts and len(parts[0]) < 8:
            header_length(b"".join(parts)[:8], max_header)  # a first chunk shorter than the length field
        data = b"".join(parts)
        del parts, have
        digest = sha256_hex(data)
        if digest != info.sha256:
            raise DigestError(f"{what}: weights sha256 {digest} != manifest's {info.sha256}")
        return decode_tensors(
            data, max_header_bytes=max_header, max_tensors=limits.max_tensors if limits is not None else None
        )


def verify_record(topic: str, record: Any, window: Mapping[int, Any], keys: list[Ed25519PublicKey]) -> _Candidate:
    """Check 1 and 2 of the module docstring on one manifest record (decoded, signed, headers agree)."""
    where = f"{topic}[{record.partition}]@{record.offset}"
    try:
        manifest = MANIFEST.decode(record.value)
    except EventError as exc:
        raise CheckpointError(f"manifest at {where} is invalid: {exc}") from None
    except RecursionError:
        # msgspec refuses deep nesting this way (in drift_state or architecture).
        raise CheckpointError(f"manifest at {where} is invalid: it nests too deeply") from None
    verify_manifest(manifest, keys)
    # Headers are not signed: a record whose headers disagree with its
    # signed manifest was not written by the publisher.
    if (record_header(record, H_MODEL), record_header(record, H_VERSION)) != (
        manifest.model.encode(),
        str(manifest.version).encode(),
    ):
        raise CheckpointError(
            f"manifest at {where} is {manifest.model} v{manifest.version} but its headers say "
            f"{record_header(record, H_MODEL)!r} v{record_header(record, H_VERSION)!r}"
        )
    return _Candidate(manifest, record, window)


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
