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

**Where each part is.** This module is the reading API; records are read
with :mod:`.fetch`, checks 1-2 are :mod:`.verify`'s, checks 3-5 and the
limits :mod:`.assemble`'s.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..bus import Consumer, make_consumer
from ..config import Settings
from ..events import CheckpointManifest
from .assemble import LoadLimits, load_weights
from .errors import CheckpointNotFoundError
from .fetch import RecordReader, Skipped, record_header
from .publish import H_MODEL, H_TYPE, H_VERSION, TYPE_MANIFEST
from .verify import PublicKeys, key_list, verify_record

__all__ = [
    "LoadedCheckpoint",
    "load_manifest_record",
    "make_reader_consumer",
    "read_latest",
    "read_version",
]


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


def make_reader_consumer(settings: Settings, **overrides: Any) -> Consumer:
    """A consumer for the readers: no group, no commits, modest fetch sizes.

    A fetch still returns a record larger than ``max_partition_fetch_bytes``
    (the broker always sends the first batch whole), so this only bounds
    how far past a window the consumer reads ahead. The broker holds a fetch
    at the end of the log at most 50 ms: a reader that seeks back (the start
    scan's windows) waits for the fetch in flight before its next one
    (librdkafka does), so the hold is paid once per window.
    """
    opts: dict[str, Any] = {
        "max_partition_fetch_bytes": 2 * 1024 * 1024,
        "fetch_max_wait_ms": min(settings.consumer_fetch_max_wait_ms, 50),
        **overrides,
    }
    return make_consumer(settings, None, **opts)


def read_latest(
    source: Settings | Consumer,
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
    source: Settings | Consumer,
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
    consumer: Consumer,
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
    reader = RecordReader(consumer, record.topic, time.monotonic() + timeout_s, prober=prober, skipped=skipped)
    candidate = verify_record(record.topic, record, window or {}, keys)
    tensors, metadata = load_weights(reader, candidate, limits)
    return LoadedCheckpoint(
        manifest=candidate.manifest,
        tensors=tensors,
        metadata=metadata,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )


def _read(
    source: Settings | Consumer,
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
            return _load(RecordReader(consumer, topic, time.monotonic() + timeout_s), keys, model, version, limits)
        finally:
            consumer.close()
    return _load(RecordReader(source, topic, time.monotonic() + timeout_s), keys, model, version, limits)


def _load(
    reader: RecordReader,
    keys: list[Ed25519PublicKey],
    model: str | None,
    version: int | None,
    limits: LoadLimits | None = None,
) -> LoadedCheckpoint:
    """The newest manifest of ``model`` (and ``version``) on every partition, verified; the best one loaded."""
    model_b = model.encode() if model is not None else None
    version_b = str(version).encode() if version is not None else None

    def wanted(record: Any) -> bool:
        return (
            record_header(record, H_TYPE) == TYPE_MANIFEST
            and (model_b is None or record_header(record, H_MODEL) == model_b)
            and (version_b is None or record_header(record, H_VERSION) == version_b)
        )

    hits = reader.newest(wanted)
    what = f"model {model!r}" if model is not None else "any model"
    if version is not None:
        what += f" version {version}"
    if not hits:
        raise CheckpointNotFoundError(f"no manifest for {what} on topic {reader.topic!r}")
    candidates = [verify_record(reader.topic, record, window, keys) for record, window in hits]
    best = max(candidates, key=lambda c: (c.manifest.created_at, c.manifest.version, -c.record.partition))
    tensors, metadata = load_weights(reader, best, limits)
    return LoadedCheckpoint(
        manifest=best.manifest,
        tensors=tensors,
        metadata=metadata,
        topic=reader.topic,
        partition=best.record.partition,
        offset=best.record.offset,
    )
