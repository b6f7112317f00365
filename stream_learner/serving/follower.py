"""The subscriber loop's work: catch up from the end of the model topic, then follow it forward.

:class:`TopicFollower` holds everything only the loop touches (the
follower consumer's position, the :class:`~stream_learner.serving.window.ChunkWindow`,
the catch-up's cost) and turns the records it reads into loaded models,
which it offers to its subscriber; the subscriber decides about swaps
(:class:`~stream_learner.serving.versions.ServedVersions`). It is used by
one thread at a time (the subscriber's thread, or the caller of
``poll_once``): it has no lock of its own. It reads the loader consumer
only inside :meth:`ReaderClients.loading <stream_learner.serving.clients.ReaderClients.loading>`.

A failure that is a failed check is handed to ``failed`` and the record is
done with; a broker failure (:func:`~stream_learner.serving.failures.is_transient`)
is raised, for the loop to retry after a back-off: before it is positioned,
the whole catch-up is retried; while following, the follower is first
seeked back to the manifest being loaded (and to the first record of every
partition this poll returned after it), so no version is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from ..checkpoint.errors import CheckpointNotFoundError
from ..checkpoint.publish import H_MODEL, H_TYPE, TYPE_CHUNK, TYPE_MANIFEST
from ..checkpoint.reader import load_manifest_record, read_latest, record_header
from ..metrics import Metrics
from .clients import CountingConsumer, ReaderClients
from .failures import is_transient
from .model import ServedModel, load_served_model
from .versions import ServedVersions
from .window import ChunkWindow, header_version

log = structlog.get_logger(__name__)

__all__ = ["FollowOptions", "TopicFollower"]

#: How often the follower looks for partitions added to the model topic (seconds).
PARTITION_REFRESH_S = 30.0


class FollowOptions(Protocol):
    """What the follower reads of its subscriber, when it needs it."""

    model: str
    topic: str
    public_keys: list[Ed25519PublicKey]
    metrics: Metrics
    poll_timeout_ms: int
    load_timeout_s: float


class Failed(Protocol):
    """Count and log a failure (the subscriber's)."""

    def __call__(self, exc: BaseException, *, what: str = "", **context: Any) -> None: ...


#: Offer a loaded model for a swap, with the monotonic time its record was read; True if swapped.
Offer = Callable[[ServedModel, float], bool]


class TopicFollower:
    """Catch up, then follow: see the module docstring."""

    def __init__(self, options: FollowOptions, clients: ReaderClients, versions: ServedVersions, *,
                 window_bytes: int, offer: Offer, failed: Failed) -> None:
        self.options = options
        self.clients = clients
        self.versions = versions
        self.window = ChunkWindow(window_bytes)  # this model's chunks read while following
        self.offer = offer
        self.failed = failed
        self.positioned = False  # False again after the consumers are closed: catch up again
        self.catch_up_stats: dict[str, Any] = {}  # the last catch-up's records, seconds, CPU seconds
        self.catch_up_records = 0  # records read by every catch-up so far
        self._model_b = options.model.encode()
        self._next_refresh = 0.0

    def catch_up(self, follower: CountingConsumer) -> bool:
        """Load the newest checkpoint from the end of the topic and position the follower after it."""
        o = self.options
        partitions = follower.partitions_for_topic(o.topic)
        if not partitions:
            raise CheckpointNotFoundError(f"topic {o.topic!r} does not exist or has no partitions (yet)")
        tps = [TopicPartition(o.topic, p) for p in sorted(partitions)]
        # End offsets before the read: whatever is appended meanwhile is followed, not missed.
        positions: dict[TopicPartition, int] = dict(follower.end_offsets(tps))
        started, cpu = time.monotonic(), time.thread_time()
        checkpoint = None
        with self.clients.loading() as loader:
            before = loader.records
            try:
                checkpoint = read_latest(loader, o.topic, o.public_keys, o.model, timeout_s=o.load_timeout_s)
            except CheckpointNotFoundError:
                log.info("no_checkpoint_yet", model=o.model, topic=o.topic)
            except Exception as exc:
                if is_transient(exc):
                    raise  # not positioned: the whole catch-up is retried after a back-off
                # The newest checkpoint is refused; nothing older is served in its place.
                self.failed(exc, what="newest checkpoint")
            finally:
                self.catch_up_records += loader.records - before
                self.catch_up_stats = {"records": loader.records - before,
                                       "seconds": round(time.monotonic() - started, 6),
                                       "cpu_seconds": round(time.thread_time() - cpu, 6)}
        served: ServedModel | None = None
        if checkpoint is not None:
            positions[TopicPartition(o.topic, checkpoint.partition)] = checkpoint.offset + 1
            try:
                served = load_served_model(checkpoint)
            except Exception as exc:  # noqa: BLE001 - refused like any other; the next version may do
                self.failed(exc, what="newest checkpoint")
        follower.assign(tps)
        for tp, offset in positions.items():
            follower.seek(tp, offset)
        self.positioned = True
        self._next_refresh = time.monotonic() + PARTITION_REFRESH_S
        log.info("subscriber_positioned", model=o.model, version=served.version if served else None,
                 positions={tp.partition: p for tp, p in positions.items()}, **self.catch_up_stats)
        return self.offer(served, started) if served is not None else False

    def follow(self, follower: CountingConsumer) -> bool:
        """Look for new partitions if it is time, then one poll: keep this model's chunks, load each
        newer manifest; True if a version was swapped in."""
        if time.monotonic() >= self._next_refresh:
            self._refresh_partitions(follower)
        batch = follower.poll(timeout_ms=self.options.poll_timeout_ms)
        read_at = time.monotonic()
        swapped = False
        items = list(batch.items())
        for n, (tp, records) in enumerate(items):
            for record in records:
                if record_header(record, H_MODEL) != self._model_b:
                    continue
                kind = record_header(record, H_TYPE)
                if kind == TYPE_CHUNK:
                    self.window.keep(record, followed=self._followed_version())
                elif kind == TYPE_MANIFEST:
                    try:
                        swapped = self._on_manifest(record, read_at) or swapped
                    except Exception as exc:
                        if not is_transient(exc):
                            raise
                        # The broker failed us mid-load: read this manifest (and
                        # whatever this poll returned after it) again after a back-off.
                        follower.seek(tp, record.offset)
                        for later_tp, later in items[n + 1:]:
                            follower.seek(later_tp, later[0].offset)
                        raise
        return swapped

    def _followed_version(self) -> int | None:
        followed = self.versions.followed
        return followed.version if followed is not None else None

    def _refresh_partitions(self, follower: CountingConsumer) -> None:
        """Follow partitions added to the topic since, from their beginning (all of it is new)."""
        topic = self.options.topic
        self._next_refresh = time.monotonic() + PARTITION_REFRESH_S
        partitions = follower.partitions_for_topic(topic) or set()
        assigned = set(follower.assignment())
        added = [TopicPartition(topic, p) for p in sorted(partitions) if TopicPartition(topic, p) not in assigned]
        if added:
            follower.assign(sorted(assigned | set(added)))  # kafka-python keeps the others' positions
            follower.seek_to_beginning(*added)
            log.info("subscriber_partitions_added", model=self.options.model,
                     partitions=[tp.partition for tp in added])

    def _on_manifest(self, record: ConsumerRecord, read_at: float) -> bool:
        o = self.options
        version, followed = header_version(record), self._followed_version()
        # A version that does not parse is loaded anyway: verification refuses
        # headers that disagree with the manifest. Headers are not signed, but
        # for the same reason skipping on the header is safe.
        if version is not None and followed is not None and version <= followed:
            self.versions.stale()
            o.metrics.serving_stale_manifests.inc()
            (log.info if version == followed else log.warning)(
                "stale_manifest_ignored", model=o.model, version=version, followed=followed,
                partition=record.partition, offset=record.offset)
            self._forget(record, followed)
            return False
        try:
            with self.clients.loading() as loader:
                checkpoint = load_manifest_record(loader, record, o.public_keys,
                                                  window=self.window.chunks(record.partition),
                                                  timeout_s=o.load_timeout_s)
            served = load_served_model(checkpoint)
        except Exception as exc:
            if is_transient(exc):
                raise
            self._forget(record, version)
            self.failed(exc, what=f"v{version}" if version is not None else "manifest",
                        partition=record.partition, offset=record.offset)
            return False
        self._forget(record, served.version)
        return self.offer(served, read_at)

    def _forget(self, manifest: ConsumerRecord, version: int | None) -> None:
        """The window's chunks before a handled manifest that no manifest to come needs."""
        self.window.forget(manifest.partition, before=manifest.offset, version=version,
                           followed=self._followed_version())
