"""The subscriber loop's work: position the follower at the end of the model topic, follow it forward.

:class:`TopicFollower` holds everything only the loop touches (the
follower consumer's positions, the
:class:`~stream_learner.serving.window.ChunkWindow`, the
:class:`~stream_learner.serving.startscan.StartScan` that finds the newest
good version before where following began) and turns the records it reads
into loaded models, which it offers to its subscriber; the subscriber
decides about swaps (:class:`~stream_learner.serving.versions.ServedVersions`).
It is used by one thread at a time (the subscriber's thread, or the caller
of ``poll_once``): it has no lock of its own. It reads the loader consumer
only inside :meth:`ReaderClients.loading <stream_learner.serving.clients.ReaderClients.loading>`.

**Start.** :meth:`TopicFollower.catch_up` takes the end offsets of every
partition and positions the follower there at once; the start scan reads
back from those ends, one bounded step per loop step (:mod:`.startscan`).
A version below the *floor* (the highest good version this node served,
:class:`~stream_learner.serving.state.FloorStore`) is refused as
``downgrade``, at start and while following.


A failure that is a failed check is handed to ``failed`` and the record is
done with; a broker failure (:func:`~stream_learner.serving.failures.is_transient`)
is raised, for the loop to retry after a back-off; while following, the
positions are first set back to the manifest being loaded (and to the
first record of every partition this poll returned after it), so no
version is skipped.

**A record too large to receive** (larger than the consumers' receive
limit) makes every fetch of its partition fail. When the follower gets
nothing for :data:`~stream_learner.checkpoint.reader.STALL_S` while the
end offsets say there is more, it reads on with the prober, one batch per
fetch: every record before the oversized one is handled as usual, the
oversized one is skipped and counted (``skipped_records``,
``last_skipped`` in ``status()``, the ``oversized`` failure reason), and
following goes on after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..bus import RECEIVE_TOO_LARGE, Record, TopicPartition
from ..checkpoint.assemble import LoadLimits
from ..checkpoint.errors import CheckpointError, CheckpointNotFoundError
from ..checkpoint.fetch import STALL_S, Skipped, probe, record_header
from ..checkpoint.publish import H_MODEL, H_TYPE, TYPE_CHUNK, TYPE_MANIFEST
from ..checkpoint.reader import load_manifest_record
from ..checkpoint.registry import TYPE_REGISTRY
from ..checkpoint.scan import ScanLimits
from ..metrics import Metrics
from .clients import CountingConsumer, ReaderClients
from .failures import Failed, Refused, is_transient
from .model import BuildPolicy, ServedModel, load_served_model
from .registry import RegistryFollower
from .startscan import StartScan
from .state import FloorStore
from .telemetry import ServingMetrics
from .versions import ServedVersions
from .window import ChunkWindow, header_version

log = structlog.get_logger(__name__)

__all__ = ["FollowOptions", "TopicFollower"]

#: How often the follower looks for partitions added to the model topic (seconds).
PARTITION_REFRESH_S = 30.0
#: Time one loop step may spend probing past a record too large to receive (seconds).
PROBE_STEP_S = 2.0


class FollowOptions(Protocol):
    """What the follower reads of its subscriber, when it needs it."""

    model: str
    topic: str
    public_keys: list[Ed25519PublicKey]
    metrics: Metrics
    poll_timeout_ms: int
    load_timeout_s: float


#: Offer a loaded model for a swap, with the monotonic time its record was read; True if swapped.
Offer = Callable[[ServedModel, float], bool]


class TopicFollower:
    """Scan back, then follow: see the module docstring."""

    def __init__(
        self,
        options: FollowOptions,
        clients: ReaderClients,
        versions: ServedVersions,
        *,
        window_bytes: int,
        offer: Offer,
        failed: Failed,
        window_records: int = 4096,
        scan_limits: ScanLimits | None = None,
        load_limits: LoadLimits | None = None,
        policy: BuildPolicy | None = None,
        floor: FloorStore | None = None,
        telemetry: ServingMetrics | None = None,
        registry: RegistryFollower | None = None,
    ) -> None:
        self.options = options
        self.registry = registry
        self.clients = clients
        self.versions = versions
        self.window = ChunkWindow(window_bytes, window_records)  # this model's chunks read while following
        self.offer = offer
        self.failed = failed
        self.load_limits = load_limits or LoadLimits()
        self.policy = policy or BuildPolicy()
        self.floor = floor or FloorStore(None, options.topic, options.model)
        self.telemetry = telemetry
        self.start_scan = StartScan(
            options,
            clients,
            versions,
            floor=self.floor.load(),
            offer=offer,
            failed=failed,
            scan_limits=scan_limits,
            load_limits=self.load_limits,
            policy=self.policy,
            telemetry=telemetry,
            registry=registry,
        )
        self.scan = self.start_scan.scan  # the floor it keeps and the records it skipped
        self.skipped = Skipped()  # records too large to receive, while following
        self.positioned = False  # False again after the consumers are closed: positioned again
        self.positions: dict[TopicPartition, int] = {}  # the next offset to read, per partition
        self.start_positions: dict[TopicPartition, int] = {}
        self._model_b = options.model.encode()
        self._next_refresh = 0.0
        self._last_progress = time.monotonic()  # the last look for a stuck partition
        self._progress: dict[TopicPartition, float] = {}  # when each partition last gave records

    # -- start ------------------------------------------------------------------------------

    def catch_up(self, follower: CountingConsumer) -> bool:
        """Position the follower: at the saved positions, or (the first time) at the end offsets,
        from which the start scan reads back; then the first scan step."""
        o = self.options
        if not self.positions:
            partitions = follower.partitions_for_topic(o.topic)
            if not partitions:
                raise CheckpointNotFoundError(f"topic {o.topic!r} does not exist or has no partitions (yet)")
            tps = [TopicPartition(o.topic, p) for p in sorted(partitions)]
            # End offsets first: whatever is appended from now on is followed, the rest scanned.
            end: dict[TopicPartition, int] = dict(follower.end_offsets(tps))
            begin: dict[TopicPartition, int] = dict(follower.beginning_offsets(tps))
            self.positions = dict(end)
            self.start_positions = dict(end)
            self.start_scan.start(begin, end)
        follower.assign(sorted(self.positions, key=lambda tp: tp.partition))
        for tp, offset in self.positions.items():
            follower.seek(tp, offset)
        self.positioned = True
        self._next_refresh = time.monotonic() + PARTITION_REFRESH_S
        self._last_progress = now = time.monotonic()
        self._progress = dict.fromkeys(self.positions, now)
        log.info(
            "subscriber_positioned",
            model=o.model,
            floor=self.scan.floor,
            positions={tp.partition: p for tp, p in self.positions.items()},
        )
        swapped = self.start_scan.step()
        self.start_scan.registry_step()  # on from where the scan left partition 0, in the same step once it is done
        return swapped

    @property
    def floor_version(self) -> int:
        """The highest good version this node knows (0: none)."""
        return self.scan.floor

    @property
    def problem(self) -> str | None:
        """Why nothing can be served, for an operator (a wrong model name), or ``None``."""
        return self.start_scan.problem

    def status(self) -> dict[str, Any]:
        """The subscriber's ``status()`` keys about the topic: the floor, the highest verified version, the
        records skipped, the window, the start scan (``catch_up``), the records followed and fetched."""
        followed, loaded = self.clients.records()
        scan = self.start_scan
        skipped = self.skipped.count + self.scan.skipped.count
        last = self.skipped.last or self.scan.skipped.last
        return {
            "floor_version": self.scan.floor,
            "highest_verified_version": max(self.scan.highest_verified or 0, self._followed_version() or 0) or None,
            "skipped_records": skipped,
            "last_skipped": {"partition": last[0], "offset": last[1]} if last else None,
            "window": {"records": len(self.window), "bytes": self.window.size},
            "catch_up": dict(scan.status()),
            "records_followed": followed,
            "records_fetched": loaded - scan.records,
        }

    # -- following --------------------------------------------------------------------------

    def follow(self, follower: CountingConsumer) -> bool:
        """A step of the start scan if it runs, new partitions if it is time, then one poll: keep this
        model's chunks, load each newer manifest; True if a version was swapped in."""
        swapped = self.start_scan.step() if self.start_scan.pending else False
        self.start_scan.registry_step()
        if time.monotonic() >= self._next_refresh:
            self._refresh_partitions(follower)
        try:
            batch = follower.poll(timeout_ms=self.options.poll_timeout_ms)
        except RECEIVE_TOO_LARGE:
            # A response too large to receive: some partition is stuck on a huge record.
            self._last_progress = 0.0
            self._progress = dict.fromkeys(self.positions, 0.0)
            batch = {}
        read_at = time.monotonic()
        items = list(batch.items())
        for tp, _ in items:
            self._progress[tp] = read_at
        # A partition that gave nothing for a while: idle, or stuck on a record too large to
        # receive (looked at no more often than every STALL_S).
        if read_at - self._last_progress >= STALL_S and any(
            read_at - self._progress.get(tp, 0.0) >= STALL_S for tp in self.positions
        ):
            swapped = self._unstick(follower) or swapped
        for n, (tp, records) in enumerate(items):
            for record in records:
                try:
                    swapped = self._handle(record, read_at) or swapped
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    # The broker failed us mid-load: read this manifest (and whatever this
                    # poll returned after it) again after a back-off.
                    self._seek(follower, tp, record.offset)
                    for later_tp, later in items[n + 1 :]:
                        self._seek(follower, later_tp, later[0].offset)
                    raise
                self.positions[tp] = record.offset + 1
        self._report_window()
        return swapped

    def _seek(self, follower: CountingConsumer, tp: TopicPartition, offset: int) -> None:
        follower.seek(tp, offset)
        self.positions[tp] = offset

    def _handle(self, record: Record, read_at: float) -> bool:
        if record_header(record, H_MODEL) != self._model_b:
            return False
        kind = record_header(record, H_TYPE)
        if kind == TYPE_CHUNK:
            self.window.keep(record, followed=self._followed_version())
        elif kind == TYPE_MANIFEST:
            return self._on_manifest(record, read_at)
        elif kind == TYPE_REGISTRY and self.registry is not None:
            self.registry.followed(record)
        return False

    def _unstick(self, follower: CountingConsumer) -> bool:
        """Nothing for a while: if records are there all the same, read on past the one that cannot be
        received (see the module docstring); True if a version was swapped in meanwhile."""
        now = self._last_progress = time.monotonic()
        tps = [tp for tp in self.positions if now - self._progress.get(tp, 0.0) >= STALL_S]
        prober = self.clients.probing()
        # Asked on the prober's connection: the follower's may be failing with the oversized fetch.
        end = prober.end_offsets(tps)
        lagging = [tp for tp in tps if end.get(tp, 0) > self.positions[tp]]
        swapped = False
        deadline = time.monotonic() + PROBE_STEP_S
        for tp in lagging:
            records, bad = probe(prober, tp, self.positions[tp], end[tp], deadline + STALL_S)
            for record in records:
                swapped = self._handle(record, time.monotonic()) or swapped
                self.positions[tp] = record.offset + 1
            if bad is not None:
                self.skipped.add(tp.partition, bad)
                if self.telemetry is not None:
                    self.telemetry.skipped_records.inc()
                self.failed(
                    Refused(
                        "oversized",
                        CheckpointError(
                            f"the record at {tp.topic}[{tp.partition}]@{bad} is larger than this node can receive "
                            f"(serving_max_record_bytes); skipped"
                        ),
                    ),
                    what="record",
                    partition=tp.partition,
                    offset=bad,
                )
                self.positions[tp] = bad + 1
            follower.seek(tp, self.positions[tp])
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
            begin = follower.beginning_offsets(added)
            for tp in added:
                self.positions[tp] = begin.get(tp, 0)
            log.info("subscriber_partitions_added", model=self.options.model, partitions=[tp.partition for tp in added])

    def _on_manifest(self, record: Record, read_at: float) -> bool:
        o = self.options
        version, followed = header_version(record), self._followed_version()
        floor = self.scan.floor
        # A version that does not parse is loaded anyway: verification refuses
        # headers that disagree with the manifest. Headers are not signed, but
        # for the same reason skipping on the header is safe.
        if version is not None and followed is not None and version <= followed:
            self.versions.stale()
            o.metrics.serving_stale_manifests.inc()
            (log.info if version == followed else log.warning)(
                "stale_manifest_ignored",
                model=o.model,
                version=version,
                followed=followed,
                partition=record.partition,
                offset=record.offset,
            )
            self._forget(record, followed)
            return False
        if version is not None and version < floor:
            self._forget(record, version)
            self.failed(
                Refused(
                    "downgrade",
                    CheckpointError(f"v{version} is below v{floor}, the highest good version this node knows"),
                ),
                what=f"v{version}",
                partition=record.partition,
                offset=record.offset,
            )
            return False
        try:
            prober = self.clients.probing()
            with self.clients.loading() as loader:
                checkpoint = load_manifest_record(
                    loader,
                    record,
                    o.public_keys,
                    window=self.window.chunks(record.partition),
                    timeout_s=o.load_timeout_s,
                    limits=self.load_limits,
                    prober=prober,
                    skipped=self.skipped,
                )
            served = load_served_model(checkpoint, self.policy)
        except Exception as exc:
            if is_transient(exc):
                raise
            self._forget(record, version)
            self.failed(
                exc,
                what=f"v{version}" if version is not None else "manifest",
                partition=record.partition,
                offset=record.offset,
            )
            return False
        self._forget(record, served.version)
        if served.version < floor:  # the header lied about the version: the signed one decides
            self.failed(
                Refused(
                    "downgrade",
                    CheckpointError(f"v{served.version} is below v{floor}, the highest good version this node knows"),
                ),
                what=f"v{served.version}",
                partition=record.partition,
                offset=record.offset,
            )
            return False
        if self.start_scan.scanning and not self._published_since_start(served):
            # Maybe a replay of an old manifest: the scan decides whether newer lies behind it.
            self.start_scan.defer(served)
            return False
        return self.offer(served, read_at)

    def _published_since_start(self, served: ServedModel) -> bool:
        """True if every chunk of ``served`` was written after the follower's start position."""
        start = self.start_positions.get(TopicPartition(self.options.topic, served.partition))
        offsets = served.manifest.weights.chunk_offsets
        return start is not None and bool(offsets) and min(offsets) >= start

    def swapped_to(self, version: int) -> None:
        """A version was swapped in: its chunks and older ones cannot be loaded any more; it is the floor."""
        self.window.prune(followed=version)
        if self.floor.save(version):
            self.scan.floor = max(self.scan.floor, version)
        if self.telemetry is not None:
            self.telemetry.floor_version.set(max(self.scan.floor, version))
        self._report_window()

    def _report_window(self) -> None:
        if self.telemetry is not None:
            self.telemetry.window_records.set(len(self.window))
            self.telemetry.window_bytes.set(self.window.size)

    def _forget(self, manifest: Record, version: int | None) -> None:
        """The window's chunks before a handled manifest that no manifest to come needs."""
        self.window.forget(
            manifest.partition, before=manifest.offset, version=version, followed=self._followed_version()
        )
