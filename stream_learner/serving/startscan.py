"""The subscriber's start scan: the newest good version before the follower's start positions.

:meth:`~stream_learner.serving.follower.TopicFollower.catch_up` positions
the follower at the end offsets of every partition at once; the newest good
version *before* them is found by a
:class:`~stream_learner.checkpoint.scan.LatestScan` that reads back from
those ends in bounded steps, one per loop step, between polls of the
follower (:meth:`StartScan.step`). So a topic whose end holds 200,000 junk
records, forged or unsigned manifests or a record too large to receive
delays nothing but the scan, which verifies every manifest it meets and
goes on past what it refuses; a broker error loses none of its progress
(the next step goes on from the same place), and nothing restarts "from the
end" again. The scan's candidates are loaded newest first; one refused at
load makes the scan go on below it. A version below the *floor* (the
highest good version this node served,
:class:`~stream_learner.serving.state.FloorStore`) is refused as
``downgrade``.

While the scan runs, a manifest the follower reads is served at once only
if its chunks were all written after the follower's start positions (a
publish that happened since): a replayed old manifest points at chunks far
back and is :meth:`deferred <StartScan.defer>` until the scan's verdict,
which is that some newer version lies between (see ``LatestScan``), or that
nothing does (:meth:`StartScan._vouched`).

The registry's start search (:mod:`.registry`) shares the scan's backward
reads of partition 0 and steps on by itself once the scan is done
(:meth:`StartScan.registry_step`). Like the follower, this is used by the
loop's one thread: it has no lock, and reads the loader consumer only
inside :meth:`ReaderClients.loading <stream_learner.serving.clients.ReaderClients.loading>`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from ..bus import TopicPartition
from ..checkpoint.assemble import LoadLimits
from ..checkpoint.errors import CheckpointError
from ..checkpoint.registry import REGISTRY_PARTITION
from ..checkpoint.scan import LatestScan, ScanLimits
from .clients import ReaderClients
from .failures import Failed, Refused, is_transient
from .model import BuildPolicy, ServedModel, load_served_model
from .registry import RegistryFollower
from .telemetry import ServingMetrics
from .versions import ServedVersions

if TYPE_CHECKING:
    from .follower import FollowOptions, Offer

log = structlog.get_logger(__name__)

__all__ = ["StartScan"]


class StartScan:
    """Scan back from the start positions, one bounded step at a time (module docstring)."""

    def __init__(
        self,
        options: FollowOptions,
        clients: ReaderClients,
        versions: ServedVersions,
        *,
        floor: int,
        offer: Offer,
        failed: Failed,
        scan_limits: ScanLimits | None,
        load_limits: LoadLimits,
        policy: BuildPolicy,
        telemetry: ServingMetrics | None,
        registry: RegistryFollower | None,
    ) -> None:
        self.options = options
        self.clients = clients
        self.versions = versions
        self.offer = offer
        self.failed = failed
        self.load_limits = load_limits
        self.policy = policy
        self.telemetry = telemetry
        self.registry = registry
        self.scan = LatestScan(options.topic, options.public_keys, options.model, floor=floor, limits=scan_limits)
        self.problem: str | None = None  # why nothing can be served, for an operator (a wrong model name)
        self.records = 0  # records read by the scan and the registry's search so far
        self._scan_seconds = [0.0, 0.0]  # wall, CPU
        self._deferred: ServedModel | None = None  # followed while the scan ran; offered after it

    def start(self, begin: dict[TopicPartition, int], end: dict[TopicPartition, int]) -> None:
        """Start the scan (once) back from ``end`` to ``begin``, and the registry's search with it."""
        o = self.options
        if not self.scan.started:
            self.scan.start(begin, end)
        registry_tp = TopicPartition(o.topic, REGISTRY_PARTITION)
        if self.registry is not None and self.registry.scan is None and registry_tp in end:
            self.registry.start(begin.get(registry_tp, 0), end[registry_tp], skipped=self.scan.skipped)
            registry = self.registry
            # One backward read for both: the registry's search takes the manifest scan's windows of
            # partition 0, and reads on by itself only once that scan is done.
            self.scan.observer = lambda tp, records, lo, hi: registry.observe(tp.partition, records, lo, hi)

    @property
    def scanning(self) -> bool:
        """True while the start scan has not finished."""
        return self.scan.started and not self.scan.done

    @property
    def pending(self) -> bool:
        """True while there is work for :meth:`step`: the scan runs, or a deferred manifest waits for it."""
        return self.scanning or self._deferred is not None

    def defer(self, served: ServedModel) -> None:
        """A manifest followed while the scan runs, maybe a replay: offered once the scan vouches for it."""
        if self._deferred is None or served.version > self._deferred.version:
            self._deferred = served
        log.info("manifest_deferred_until_scan", model=self.options.model, version=served.version)

    def step(self) -> bool:
        """One bounded step of the start scan, then, once it is done, its candidates loaded newest first."""
        if not self.scan.started or (self.scan.done and not self.scan.candidates() and self._deferred is None):
            return False
        o = self.options
        started, cpu = time.monotonic(), time.thread_time()
        swapped = False
        prober = self.clients.probing()  # before the loader's lock, which making it takes
        with self.clients.loading() as loader:
            before = loader.records
            try:
                candidates = self.scan.step(loader, prober=prober, deadline_s=o.load_timeout_s)
                while candidates:
                    candidate = candidates.pop(0)
                    followed = self._followed_version()
                    if followed is not None and candidate.manifest.version <= followed:
                        candidates = []  # something as new is served already (followed meanwhile)
                        break
                    try:
                        checkpoint = self.scan.load(
                            loader, candidate, limits=self.load_limits, prober=prober, timeout_s=o.load_timeout_s
                        )
                        served = load_served_model(checkpoint, self.policy)
                    except Exception as exc:
                        if is_transient(exc):
                            raise
                        self.failed(
                            exc,
                            what=f"start v{candidate.manifest.version}",
                            partition=candidate.record.partition,
                            offset=candidate.record.offset,
                        )
                        self.scan.resume(candidate)  # scan on below it
                        continue
                    self._report()  # refusals counted before the swap wakes anyone waiting for it
                    swapped = self.offer(served, started)
                    candidates = []
                    self._finish_scan()
            finally:
                self.records += loader.records - before
                self._scan_seconds[0] += time.monotonic() - started
                self._scan_seconds[1] += time.thread_time() - cpu
                self._report()
        if self.scan.done and self.scan.started:
            if not self.scan.candidates() or self._followed_version() is not None:
                self._finish_scan()
            if not self.scan.candidates() and self._followed_version() is None and self.problem is None:
                self._nothing_found()
            if self._deferred is not None:
                deferred, self._deferred = self._deferred, None
                if self._vouched(deferred):
                    swapped = self.offer(deferred, time.monotonic()) or swapped
        return swapped

    def _nothing_found(self) -> None:
        """The start scan met no signed manifest of this model: say so, naming the models the topic holds
        (a wrong model name), without counting a failure (no record was refused)."""
        if self.scan.highest_verified is not None:
            return  # versions were there and refused: counted by reason already
        o = self.options
        others = sorted(self.scan.other_models)
        if others:
            self.problem = (
                f"no checkpoint of model {o.model!r} on topic {o.topic!r}; the topic holds checkpoints of "
                f"{', '.join(repr(m) for m in others)} (serving_model, else trainer_model, names the model "
                f"served); following on in case {o.model!r} appears"
            )
            log.warning("model_not_on_topic", model=o.model, topic=o.topic, models_on_topic=others)
        else:
            self.problem = f"no checkpoint of model {o.model!r} on topic {o.topic!r} yet; following on"
            log.info("model_not_on_topic_yet", model=o.model, topic=o.topic)

    def _finish_scan(self) -> None:
        """Nothing more to scan: drop what is left (the candidates older than what is served)."""
        if self.scan._parts is not None:  # a finished scan keeps its stats, not its candidates
            for part in self.scan._parts.values():
                part.done, part.best, part.kept = True, None, {}

    def _vouched(self, served: ServedModel) -> bool:
        """A manifest followed while the scan ran, whose chunks are older than the start: served only if
        the scan read back to its first chunk (nothing newer hides between) or the floor vouches for it."""
        reached = self.scan.reached(served.partition)
        offsets = served.manifest.weights.chunk_offsets
        if self.scan.floor > 0 or (reached is not None and offsets and reached <= min(offsets)):
            return True
        self.failed(
            Refused(
                "unconfirmed",
                CheckpointError(
                    f"v{served.version}: its chunks lie before where the start scan could read back to, and no floor "
                    f"vouches for it (a replayed manifest may hide newer versions)"
                ),
            ),
            what=f"v{served.version}",
            partition=served.partition,
            offset=served.offset,
        )
        return False

    def registry_step(self) -> None:
        """One bounded step of the registry's start search, while it runs (with the loader, like the scan)."""
        registry = self.registry
        if registry is None or registry.scan is None or registry.ready or self.scanning:
            return
        prober = self.clients.probing()
        with self.clients.loading() as loader:
            before = loader.records
            try:
                registry.step(loader, prober=prober, deadline_s=self.options.load_timeout_s)
            finally:
                self.records += loader.records - before

    def status(self) -> dict[str, Any]:
        """The start scan's progress (records and bytes read, done, exhausted, ...) and its time so far."""
        return {
            **self.scan.stats(),
            "seconds": round(self._scan_seconds[0], 6),
            "cpu_seconds": round(self._scan_seconds[1], 6),
        }

    def _report(self) -> None:
        for refusal in self.scan.take_refusals():
            self.failed(
                Refused(refusal.reason, refusal.error),
                what="start scan",
                partition=refusal.partition,
                offset=refusal.offset,
            )
        stats = self.status()
        if self.telemetry is not None:
            self.telemetry.scan_records.set(stats["records"])
            if stats["highest_verified"] is not None:
                self.telemetry.highest_verified_version.set(stats["highest_verified"])

    def _followed_version(self) -> int | None:
        followed = self.versions.followed
        return followed.version if followed is not None else None
