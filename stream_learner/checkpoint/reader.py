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

**Where a serving node starts.** :class:`LatestScan` is the search a node
starts from, where the end of the topic may hold anything a writer
without the key appended: it verifies every manifest it meets, goes on
past what it refuses, confirms a candidate only once it has read back to
its chunks (so a replayed old manifest loses to the versions between),
refuses versions below a floor, and runs in bounded, resumable steps.
:func:`newest_version` runs it to its end for a trainer numbering its
versions. :func:`read_latest` keeps its own rule (the newest manifest
record is authoritative, never a fallback): a tool's or a test's precise
answer about what is at the end of the topic.

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
    SignatureError,
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


def newest_version(
    consumer: KafkaConsumer,
    topic: str,
    public_key: PublicKeys,
    model: str,
    *,
    timeout_s: float = 60.0,
    limits: ScanLimits | None = None,
) -> tuple[int, list[Refusal]]:
    """The highest *signed* version of ``model`` on the topic (0 if none), and what the scan refused.

    A :class:`LatestScan` run to its end: records a writer without the key
    appended (unsigned, forged or malformed manifests) are passed over and
    returned as refusals instead of raising, so they cannot stop a trainer
    numbering its versions; a signed manifest counts whatever became of its
    chunks, so no version number is ever used twice. Raises
    :class:`ReadTimeoutError` if the scan does not finish within ``timeout_s``.
    """
    scan = LatestScan(topic, public_key, model, limits=limits)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not tps:
        raise CheckpointError(f"topic {topic!r} does not exist or has no partitions")
    scan.start(consumer.beginning_offsets(tps), consumer.end_offsets(tps))
    deadline = time.monotonic() + timeout_s
    while scan.step(consumer, deadline_s=max(0.1, deadline - time.monotonic())) is None:
        if time.monotonic() > deadline:
            raise ReadTimeoutError(f"the scan of {topic!r} for {model!r} did not finish in {timeout_s:g} s")
    return scan.highest_verified or 0, scan.take_refusals()


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


# -- the serving side's start: a verified, bounded, resumable backward scan ------------------


@dataclass(frozen=True)
class ScanLimits:
    """Bounds of one :class:`LatestScan`: in all (``max_records``, ``max_bytes``), per
    :meth:`LatestScan.step` (``step_records``, ``step_s``), and the bytes one backward window
    holds (``window_bytes``, which also bounds the candidate's chunks kept for its load)."""

    max_records: int = 2_000_000
    max_bytes: int = 2 << 30
    step_records: int = 50_000
    step_s: float = 0.5
    window_bytes: int = 8 << 20


@dataclass
class Refusal:
    """A record the scan passed over: why (a failure reason), and where."""

    reason: str
    error: BaseException
    partition: int
    offset: int


@dataclass
class _PartitionScan:
    tp: TopicPartition
    cursor: int  # the next window ends here (exclusive)
    begin: int
    best: _Candidate | None = None  # the newest verified manifest above the floor not yet confirmed
    confirm_at: int = 0  # best is confirmed once the cursor is at or below its first chunk's offset
    done: bool = False
    avg_bytes: float = 1024.0  # of the records read, to size the next window in records
    size: int = 1  # records in the next window: doubles, as read_latest's, up to the bytes allowed
    kept: dict[int, Any] = field(default_factory=dict)  # best's chunks read on the way, by offset
    kept_bytes: int = 0
    needed: set[int] = field(default_factory=set)  # best's chunk offsets


class LatestScan:
    """Find the newest *verified* checkpoint of ``model`` from the end of the topic, in bounded steps.

    Unlike :func:`read_latest` (the newest manifest record is authoritative),
    this is what a serving node starts from, where the end of the topic may
    hold anything a writer without the key appended:

    * every record whose headers say it is a manifest of ``model`` is
      decoded and its signature verified as the scan meets it; one that
      fails is a :class:`Refusal` (reason ``invalid``, ``signature``) and the
      scan goes on past it;
    * a verified manifest below ``floor`` (the highest good version the
      node knows) is refused as ``downgrade``;
    * a verified manifest is *confirmed* only once the scan has read back
      to its first chunk: any newer verified version met on the way wins.
      An old manifest replayed onto the end of the topic points at chunks
      far back, and every version published after it lies between: the
      scan meets them and the replay loses, without any state;
    * a partition is done when its candidate is confirmed, at its
      beginning, or (another partition being confirmed at record time
      ``T``) at a record older than ``T``; the scan is done when every
      partition is, or when ``limits.max_records`` or ``max_bytes`` are
      spent (an unconfirmed candidate is then refused as ``unconfirmed``,
      unless a floor above 0 vouches for it: it is at or above it);
    * :meth:`step` does at most ``step_records`` or ``step_s`` of it and
      returns: the caller follows the topic meanwhile, and a broker error
      loses nothing (the next step goes on from the same cursor, with
      whatever consumer the caller has by then);
    * a record larger than the consumer's receive limit is skipped (with a
      ``prober``, see :func:`probe`) and counted in ``skipped``.

    :meth:`step` returns the confirmed candidates in the order to try
    (newest version first) once the scan is done; :meth:`load` loads one.
    If it is then refused (its chunks, its weights), :meth:`resume` scans
    on below it.
    """

    def __init__(
        self, topic: str, public_keys: PublicKeys, model: str, *, floor: int = 0, limits: ScanLimits | None = None
    ) -> None:
        self.topic = topic
        self.keys = key_list(public_keys)
        self.model = model
        self._model_b = model.encode()
        self.floor = floor
        self.limits = limits or ScanLimits()
        self.records = 0
        self.bytes = 0
        self.skipped = Skipped()
        self.refusals: list[Refusal] = []  # since the caller last took them
        self.highest_verified: int | None = None  # the highest signed version met, whatever came of it
        self.exhausted = False
        self.other_models: set[str] = set()  # other models with a verified manifest met (see _note_other)
        # Called with every window read, (partition, records, lo, hi), before it is handled: a scan of
        # other records back from the same end (the registry's) uses the same read.
        self.observer: Callable[[TopicPartition, list[Any], int, int], None] | None = None
        self._tried: set[bytes] = set()
        self._parts: dict[TopicPartition, _PartitionScan] | None = None
        self._offsets: tuple[dict[TopicPartition, int], dict[TopicPartition, int]] | None = None

    # -- state ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once :meth:`start` has taken the topic's offsets."""
        return self._parts is not None

    @property
    def done(self) -> bool:
        """True when there is nothing left to scan."""
        return self._parts is not None and all(p.done for p in self._parts.values())

    def start(self, begin: Mapping[TopicPartition, int], end: Mapping[TopicPartition, int]) -> None:
        """Scan back from ``end`` (the offsets the caller follows from) to ``begin``."""
        self._offsets = (dict(begin), dict(end))
        self._parts = {
            tp: _PartitionScan(tp, end[tp], begin.get(tp, 0), done=end[tp] <= begin.get(tp, 0)) for tp in end
        }

    def stats(self) -> dict[str, Any]:
        """JSON-able progress: records and bytes read, partitions left, skipped records."""
        parts = self._parts or {}
        return {
            "records": self.records,
            "bytes": self.bytes,
            "done": self.done,
            "exhausted": self.exhausted,
            "partitions_left": sorted(p.tp.partition for p in parts.values() if not p.done),
            "skipped_records": self.skipped.count,
            "highest_verified": self.highest_verified,
        }

    def reached(self, partition: int) -> int | None:
        """The lowest offset the scan read back to in ``partition`` (None: not scanned)."""
        part = (self._parts or {}).get(TopicPartition(self.topic, partition))
        return part.cursor if part is not None else None

    def take_refusals(self) -> list[Refusal]:
        """The refusals since the last call (the caller counts and logs them)."""
        out, self.refusals = self.refusals, []
        return out

    # -- scanning ---------------------------------------------------------------

    def step(self, consumer: Any, *, prober: Any = None, deadline_s: float = 60.0) -> list[_Candidate] | None:
        """Scan one bounded step; ``None`` while not done, else the confirmed candidates, best first."""
        if self._parts is None or self._offsets is None:
            raise RuntimeError("LatestScan.step before start")
        reader = _Reader(
            consumer,
            self.topic,
            time.monotonic() + deadline_s,
            prober=prober,
            skipped=self.skipped,
            offsets=self._offsets,
        )
        limits = self.limits
        started, records_before = time.monotonic(), self.records
        while not self.done:
            if self.records >= limits.max_records or self.bytes >= limits.max_bytes:
                self._exhaust()
                break
            if self.records - records_before >= limits.step_records or time.monotonic() - started >= limits.step_s:
                return None
            for part in list(self._parts.values()):
                if not part.done:
                    self._window(reader, part)
        return self.candidates()

    def candidates(self) -> list[_Candidate]:
        """The confirmed candidates, the newest version first."""
        found = [p.best for p in (self._parts or {}).values() if p.best is not None and p.done]
        return sorted(found, key=lambda c: (c.manifest.version, c.manifest.created_at), reverse=True)

    def load(
        self,
        consumer: Any,
        candidate: _Candidate,
        *,
        limits: LoadLimits | None = None,
        prober: Any = None,
        timeout_s: float = 60.0,
    ) -> LoadedCheckpoint:
        """The weights of a confirmed candidate (chunks kept on the way, the rest fetched by offset)."""
        reader = _Reader(
            consumer,
            self.topic,
            time.monotonic() + timeout_s,
            prober=prober,
            skipped=self.skipped,
            offsets=self._offsets,
        )
        tensors, metadata = reader.weights(candidate, limits)
        record = candidate.record
        return LoadedCheckpoint(
            manifest=candidate.manifest,
            tensors=tensors,
            metadata=metadata,
            topic=self.topic,
            partition=record.partition,
            offset=record.offset,
        )

    def resume(self, candidate: _Candidate) -> None:
        """``candidate`` was refused at load: scan on below it in its partition."""
        assert self._parts is not None
        part = self._parts[TopicPartition(self.topic, candidate.record.partition)]
        if part.best is candidate:
            part.best, part.kept, part.kept_bytes, part.needed = None, {}, 0, set()
            part.done = part.cursor <= part.begin or self.exhausted

    def _note_other(self, record: Any) -> None:
        """Remember the name of another model with a verified manifest (bounded: one verification per
        name, :data:`MAX_OTHER_MODELS` names): what a node asked for a model the topic lacks says."""
        name = record_header(record, H_MODEL)
        if (
            name is None
            or record_header(record, H_TYPE) != TYPE_MANIFEST
            or name in self._tried
            or len(self._tried) >= 4 * MAX_OTHER_MODELS
            or len(self.other_models) >= MAX_OTHER_MODELS
        ):
            return
        self._tried.add(name)
        try:
            self.other_models.add(verify_record(self.topic, record, {}, self.keys).manifest.model)
        except Exception:  # noqa: BLE001 - a name only counts when a trusted key signed it
            return

    def _exhaust(self) -> None:
        assert self._parts is not None
        self.exhausted = True
        for part in self._parts.values():
            if not part.done and part.best is not None and self.floor > 0:
                part.done = True  # not confirmed, but at or above the floor: no downgrade in any case
                continue
            if not part.done and part.best is not None:
                best, part.best = part.best, None
                self.refusals.append(
                    Refusal(
                        "unconfirmed",
                        CheckpointError(
                            f"{self.model} v{best.manifest.version} at {self.topic}[{part.tp.partition}]@"
                            f"{best.record.offset}: the scan's budget ran out before its chunks "
                            f"(a replayed manifest hides newer versions behind it)"
                        ),
                        part.tp.partition,
                        best.record.offset,
                    )
                )
            part.done = True

    def _window(self, reader: _Reader, part: _PartitionScan) -> None:
        """Read one window back from the cursor and handle its records, newest first."""
        size = max(1, min(part.size, MAX_SCAN_WINDOW, int(self.limits.window_bytes / max(part.avg_bytes, 1.0))))
        hi = part.cursor
        while True:
            lo = max(part.begin, hi - size)
            try:
                # Bounded in bytes as it is read: small records before may hide large ones here.
                records = reader.read_range(part.tp, lo, hi, max_bytes=None if size == 1 else self.limits.window_bytes)
                break
            except _Overflow as over:
                size = max(1, (over.position - lo) // 2)  # read fewer, from the same end
        part.size = size * 2
        part.cursor = lo
        if self.observer is not None:
            self.observer(part.tp, records, lo, hi)
        if records:
            cost = sum(record_bytes(r) for r in records)
            self.records += len(records)
            self.bytes += cost
            part.avg_bytes = cost / len(records)
        else:
            self.records += hi - lo  # a gap (compaction, transactions): progress all the same
        window = {r.offset: r for r in records}
        bound = self._bound(part)
        # A partition done mid-window keeps its cursor just above the records it has not handled:
        # if its candidate is then refused at load, resume() goes on from there, so a version
        # between it and the window's end (a full one below a delta the node cannot apply) is met.
        for record in reversed(records):
            if bound is not None and record.timestamp < bound and part.best is None:
                part.done, part.cursor = True, record.offset + 1
                return
            if part.best is not None and record.offset < part.confirm_at:
                # Read back to its first chunk: confirmed; older records do not matter.
                part.done, part.cursor = True, record.offset + 1
                return
            self._record(part, record, window)
            if part.done:
                part.cursor = record.offset
                return
        if part.best is not None and part.cursor <= part.confirm_at:
            part.done = True
        elif part.cursor <= part.begin:
            part.done = True

    def _bound(self, part: _PartitionScan) -> int | None:
        assert self._parts is not None
        times = [
            p.best.record.timestamp for p in self._parts.values() if p is not part and p.done and p.best is not None
        ]
        return max(times) if times else None

    def _record(self, part: _PartitionScan, record: Any, window: dict[int, Any]) -> None:
        if record_header(record, H_MODEL) != self._model_b:
            self._note_other(record)
            return
        kind = record_header(record, H_TYPE)
        best = part.best
        if kind == TYPE_CHUNK:
            if best is not None and record.offset in part.needed:
                size = len(record.value or b"")
                if part.kept_bytes + size <= self.limits.window_bytes:
                    part.kept[record.offset] = record
                    part.kept_bytes += size
            return
        if kind != TYPE_MANIFEST:
            return
        try:
            candidate = verify_record(self.topic, record, {}, self.keys)
        except Exception as exc:  # noqa: BLE001 - every record is refused alike; the scan goes on
            reason = "signature" if isinstance(exc, SignatureError) else "invalid"
            self.refusals.append(Refusal(reason, exc, record.partition, record.offset))
            return
        manifest = candidate.manifest
        self.highest_verified = max(self.highest_verified or 0, manifest.version)
        if best is not None and manifest.version <= best.manifest.version:
            return  # history below a newer candidate found later in the log
        if manifest.version < self.floor:
            self.refusals.append(
                Refusal(
                    "downgrade",
                    CheckpointError(
                        f"{manifest.model} v{manifest.version} at {self.topic}[{record.partition}]@"
                        f"{record.offset} is below v{self.floor}, the highest good version this node knows"
                    ),
                    record.partition,
                    record.offset,
                )
            )
            return
        # A newer version: the candidate now, confirmed once the scan reaches its first chunk.
        offsets = manifest.weights.chunk_offsets
        part.best = _Candidate(manifest, record, {})
        part.needed = set(offsets)
        part.kept = {o: window[o] for o in part.needed if o in window and o < record.offset}
        part.kept_bytes = sum(len(r.value or b"") for r in part.kept.values())
        part.best.window = part.kept
        part.confirm_at = min([o for o in offsets if o < record.offset], default=record.offset)
        if part.kept and part.kept_bytes > self.limits.window_bytes:
            part.kept, part.kept_bytes = {}, 0
            part.best.window = part.kept
        if part.cursor <= part.confirm_at:
            part.done = True


#: Names of other models the scan remembers, at most (a wrong model name is answered with them).
MAX_OTHER_MODELS = 32

#: Records in one backward window of the scan, at most (its bytes are bounded by ScanLimits.window_bytes).
MAX_SCAN_WINDOW = 8192
