"""The trainer role: examples -> online learner -> signed checkpoints, effectively once.

The trainer reads the examples topic by manual assignment, not through a
consumer group: where it resumes comes from its own state, never from
offsets committed to Kafka (those are written for monitoring only, Flink's
rule). Examples are taken in chunks of exactly ``trainer_batch_size``
records in offset order, so chunk boundaries depend only on the stream; a
partial chunk is trained only when the trainer has caught up and waited
``trainer_max_wait_ms`` (the end of the stream, or a pause in traffic).

A checkpoint (every ``trainer_checkpoint_every_examples`` examples, every
``trainer_checkpoint_every_s`` seconds, and when a drift policy asks for
one) is taken at a chunk boundary, in this order:

1. the version counter moves to ``v``; the manifest of ``v`` (counts,
   metrics, drift state, feature spec, architecture, digest of the weights)
   is built;
2. the whole trainer state (weights, optimizer, featurizer, detectors,
   dedup window, the examples offsets applied, ``v`` and its manifest) is
   saved to the state store, atomically;
3. only then are the weights and the signed manifest of ``v`` published;
4. the applied offsets are committed to Kafka, for monitoring.

On start the trainer restores the state, seeks to the applied offsets, and
republishes ``v`` if the model topic does not hold it yet (a crash between 2
and 3): versions have no gaps and no repeats, and a serving node never sees
a version the trainer could lose. Duplicate examples (the joiner is at
least once) are dropped by example id.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
import torch
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from ..bus import DeadLetters, make_consumer, make_producer
from ..checkpoint.codec import encode_tensors
from ..checkpoint.errors import CheckpointNotFoundError
from ..checkpoint.publish import publish_checkpoint, weights_info
from ..checkpoint.reader import make_reader_consumer, read_latest
from ..checkpoint.signing import load_private_key
from ..checkpoint.state import DirectoryStateStore, RedisStateStore, Snapshot, StateStore
from ..config import Settings
from ..drift import (
    Checkpoint, DriftFinding, DriftMonitor, DriftPolicy, LrBoost, OptimizerReset, PromoteChallengerIfBetter,
    StartChallenger, drift_event,
)
from ..errors import ConfigError, EventError
from ..events import EXAMPLE, CheckpointManifest, Codec, Source, encode, now_ms
from ..metrics import Metrics
from ..redis_conn import make_redis
from .learner import LearnerConfig, OnlineLearner
from .models import ModelSpec

log = structlog.get_logger(__name__)


def learner_config(settings: Settings) -> LearnerConfig:
    """The learner configuration the settings describe."""
    if not settings.trainer_features:
        raise ConfigError("trainer_features is empty: declare the model's features (STREAM_LEARNER_TRAINER_FEATURES)")
    try:
        spec = ModelSpec(kind=settings.trainer_architecture, task=settings.trainer_task,
                         features=tuple(settings.trainer_features), classes=tuple(settings.trainer_classes),
                         hidden=tuple(settings.trainer_hidden), seed=settings.trainer_seed)
    except ValueError as exc:
        raise ConfigError(f"invalid model settings: {exc}") from None
    return LearnerConfig(
        model_name=settings.trainer_model, spec=spec, optimizer=settings.trainer_optimizer,
        lr=settings.trainer_lr, weight_decay=settings.trainer_weight_decay, clip_norm=settings.trainer_clip_norm,
        spike_factor=settings.trainer_spike_factor, spike_warmup_batches=settings.trainer_spike_warmup_batches,
        spike_patience=settings.trainer_spike_patience,
        pseudo_enabled=settings.trainer_pseudo_enabled, pseudo_threshold=settings.trainer_pseudo_threshold,
        pseudo_weight=settings.trainer_pseudo_weight, dedup_window=settings.trainer_dedup_window,
        metrics_window=settings.trainer_metrics_window,
    )


def state_store(settings: Settings) -> StateStore:
    """The state store the settings name (a directory by default, or Redis)."""
    if settings.trainer_state_store == "redis":
        return RedisStateStore(make_redis(settings), f"sl:trainer:{settings.trainer_model}:state")
    return DirectoryStateStore(settings.trainer_state_dir)


class Trainer:
    """One trainer process for one model. ``run()`` loops; ``step()`` is one poll.

    ``drift`` is a :class:`~stream_learner.drift.DriftMonitor` (or None for
    none) and ``policy`` the :class:`~stream_learner.drift.DriftPolicy` that
    answers its findings; ``on_checkpoint`` is called with every published
    manifest.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        drift: DriftMonitor | None = None,
        policy: DriftPolicy | None = None,
        store: StateStore | None = None,
        poll_timeout_ms: int = 100,
        on_checkpoint: Callable[[CheckpointManifest], None] | None = None,
    ) -> None:
        if not settings.trainer_signing_key:
            raise ConfigError("trainer_signing_key is not set: the trainer signs every checkpoint "
                              "(generate one with `stream-learner keys generate`)")
        self.settings = settings
        self.metrics = metrics or Metrics()
        torch.set_num_threads(settings.trainer_torch_threads)
        self.private_key = load_private_key(settings.trainer_signing_key)
        self.public_key = self.private_key.public_key()
        self.learner = OnlineLearner(learner_config(settings), drift=drift)
        self.policy = policy or DriftPolicy()
        self.store = store or state_store(settings)
        self.poll_timeout_ms = poll_timeout_ms
        self.on_checkpoint = on_checkpoint
        self.codec: Codec[Any] = Codec(EXAMPLE.event_type, settings.max_event_bytes)
        self.consumer = make_consumer(settings, group_id=settings.trainer_group_id)
        self.producer = make_producer(settings, max_request_size=settings.trainer_chunk_bytes + 64 * 1024)
        self.dead_letters = DeadLetters(self.producer, settings.topic_dlq, stage="trainer", metrics=self.metrics)
        self.buffer: list[Any] = []
        self.buffer_since = 0.0
        self.version = 0
        self.offsets: dict[int, int] = {}
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.force_checkpoint = False
        self.published: list[CheckpointManifest] = []
        self._restore()
        # torch (and torch._dynamo, which Adam imports) leave ~370k long-lived
        # objects; moved out of the collector's way, full collections stop
        # costing 7-21% of the trainer's time (bench/README.md).
        gc.freeze()

    # -- start-up ------------------------------------------------------------------

    def _restore(self) -> None:
        topic = self.settings.topic_examples
        parts = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or [0])]
        self.consumer.assign(parts)
        snapshot = self.store.load()
        pending: dict[str, Any] | None = None
        if snapshot is not None:
            self.learner.load_state_dict(snapshot.tensors, snapshot.meta["learner"])
            self.version = int(snapshot.meta["version"])
            self.offsets = {int(p): int(o) for p, o in snapshot.meta["offsets"].items()}
            pending = snapshot.meta.get("manifest")
            log.info("trainer_restored", version=self.version, offsets=self.offsets)
        for tp in parts:
            if tp.partition in self.offsets:
                self.consumer.seek(tp, self.offsets[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        if pending is not None and self._published_version() < self.version:
            # Crashed between saving the state and publishing it: publish now.
            log.info("trainer_republish", version=self.version)
            self._publish(msgspec.convert(pending, CheckpointManifest),
                          self._weights_bytes(snapshot.tensors))

    def _published_version(self) -> int:
        consumer = make_reader_consumer(self.settings)
        try:
            latest = read_latest(consumer, self.settings.topic_models, self.public_key, self.settings.trainer_model)
            return latest.manifest.version
        except CheckpointNotFoundError:
            return 0
        finally:
            consumer.close()

    # -- the loop --------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Train until ``stop`` is set, then close."""
        stop = stop or threading.Event()
        log.info("trainer_started", model=self.settings.trainer_model, version=self.version)
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> int:
        """Poll once; train every full chunk (and a partial one when caught up and waited)."""
        batch = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=10 * self.settings.trainer_batch_size)
        n = 0
        for tp in sorted(batch, key=lambda t: t.partition):
            records = batch[tp]
            if records and not self.buffer:
                self.buffer_since = time.monotonic()
            self.buffer.extend(records)  # whole lists: a per-record loop cost ~0.2 us per example
            n += len(records)
        size = self.settings.trainer_batch_size
        while len(self.buffer) >= size:
            self._train(self.buffer[:size])
            del self.buffer[:size]
        waited = (time.monotonic() - self.buffer_since) * 1000 >= self.settings.trainer_max_wait_ms
        if n == 0 and self.buffer and waited and self._caught_up():
            self._train(self.buffer)
            self.buffer = []
        if self.since_checkpoint and (
            self.force_checkpoint
            or self.since_checkpoint >= self.settings.trainer_checkpoint_every_examples
            or time.monotonic() - self.last_checkpoint >= self.settings.trainer_checkpoint_every_s
        ):
            self.checkpoint()
        return n

    def _caught_up(self) -> bool:
        """True when the broker holds nothing we have not read. An empty poll
        alone is not enough: a slow fetch would then cut a partial chunk mid
        stream, and chunk boundaries must depend on the stream only."""
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None or self.consumer.position(tp) < highwater:
                return False
        return True

    def _train(self, records: list[Any]) -> None:
        examples, kept, dead = [], [], []
        decode, add_example, add_kept = self.codec.decode, examples.append, kept.append
        for record in records:
            try:
                add_example(decode(record.value))
                add_kept(record)
            except EventError as exc:
                dead.append(self.dead_letters.send(record, exc))
        result = self.learner.process(examples)
        for rejected in result.rejected:
            err = EventError(rejected.kind, "$.label", rejected.reason)
            dead.append(self.dead_letters.send(kept[rejected.index], err))
        for future in dead:
            future.get(timeout=60)
        if result.findings:  # the chunk's event time is only needed for drift events
            event_time = max((x.label_time or x.prediction_time for x in examples), default=0)
            for finding in result.findings:
                self._on_drift(finding, event_time)
        for record in records:
            self.offsets[record.partition] = record.offset + 1
        self.since_checkpoint += len(records)
        self.metrics.trainer_examples.inc(len(records))
        if not math.isnan(result.loss):
            self.metrics.trainer_loss.set(result.loss)

    def _on_drift(self, finding: DriftFinding, event_time: int) -> None:
        """Apply a drift finding's policy actions and emit its drift event (at a chunk boundary)."""
        actions = apply_drift_policy(self.learner, self.policy, finding)
        if any(isinstance(action, Checkpoint) for action in actions):
            self.force_checkpoint = True
        event = drift_event(finding, actions, model=self.settings.trainer_model, event_time=event_time,
                            model_version=self.version or None)
        self.producer.send(self.settings.topic_drift, key=self.settings.trainer_model.encode(), value=encode(event))
        self.metrics.trainer_drifts.labels(kind=finding.kind.value, detector=finding.detector).inc()
        log.warning("drift", detector=finding.detector, signal=finding.signal, kind=finding.kind.value,
                    index=finding.index, actions=event.actions)

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint(self) -> CheckpointManifest:
        """Save the state, then publish it as the next version (see the module docstring)."""
        self.producer.flush()  # drift events of the chunks this checkpoint covers
        version = self.version + 1
        tensors, learner_meta = self.learner.state_dict()
        weights = self._weights_bytes(tensors)
        manifest = build_manifest(
            self.learner, model=self.settings.trainer_model, version=version, parent=self.version or None,
            input_offsets=[Source(self.settings.topic_examples, p, o) for p, o in sorted(self.offsets.items())],
            weights=weights, chunk_bytes=self.settings.trainer_chunk_bytes,
        )
        self.store.save(Snapshot(tensors, {
            "version": version, "offsets": {str(p): o for p, o in self.offsets.items()},
            "manifest": msgspec.json.decode(encode(manifest)), "learner": learner_meta,
        }))
        self.version = version
        signed = self._publish(manifest, weights)
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.force_checkpoint = False
        try:
            self.consumer.commit({TopicPartition(self.settings.topic_examples, p): OffsetAndMetadata(o, "", -1)
                                  for p, o in self.offsets.items()})
        except Exception as exc:  # noqa: BLE001 - monitoring only; the state is what counts
            log.warning("trainer_commit_failed", error=str(exc))
        return signed

    def _weights_bytes(self, state_tensors: dict[str, torch.Tensor]) -> bytes:
        # Derived from the saved state, so a republish after a crash yields the
        # very bytes (and digest) the saved manifest describes.
        return encode_tensors(servable_weights(state_tensors), {"model": self.settings.trainer_model})

    def _publish(self, manifest: CheckpointManifest, weights: bytes) -> CheckpointManifest:
        signed = publish_checkpoint(self.producer, self.settings.topic_models, manifest, weights,
                                    self.private_key, chunk_bytes=self.settings.trainer_chunk_bytes)
        self.published.append(signed)
        self.metrics.trainer_checkpoints.inc()
        self.metrics.trainer_version.set(signed.version)
        log.info("checkpoint_published", version=signed.version, metrics=signed.metrics)
        if self.on_checkpoint is not None:
            self.on_checkpoint(signed)
        return signed

    def close(self) -> None:
        """Close the clients (state is saved at checkpoints only)."""
        self.producer.flush()
        self.consumer.close(autocommit=False)
        self.producer.close()
        log.info("trainer_stopped", version=self.version, counts=self.learner.counts)


def apply_drift_policy(learner: OnlineLearner, policy: DriftPolicy, finding: DriftFinding) -> list[Any]:
    """Decide the policy's actions for ``finding`` and apply those that act on the learner.

    Returns every action decided; a :class:`~stream_learner.drift.Checkpoint`
    is the caller's to honour (the trainer and replay publish at once). Shared
    by the trainer and replay so both answer a drift the same way.
    """
    actions = policy.decide(finding, challenger_active=learner.challenger is not None)
    for action in actions:
        if isinstance(action, LrBoost):
            learner.boost_lr(action.factor, action.steps)
        elif isinstance(action, OptimizerReset):
            learner.reset_optimizer()
        elif isinstance(action, StartChallenger):
            learner.start_challenger()
        elif isinstance(action, PromoteChallengerIfBetter):
            promoted = learner.promote_challenger_if_better()
            log.info("challenger", promoted=promoted)
    return list(actions)


def build_manifest(
    learner: OnlineLearner,
    *,
    model: str,
    version: int,
    parent: int | None,
    input_offsets: list[Source],
    weights: bytes,
    chunk_bytes: int,
) -> CheckpointManifest:
    """The (unsigned) manifest of ``learner``'s current state as checkpoint ``version`` of ``model``."""
    c = learner.counts
    return CheckpointManifest(
        model=model, version=version, parent=parent, created_at=now_ms(), input_offsets=input_offsets,
        counts={"labeled": c["labeled"], "pseudo": c["pseudo"], "late": c["late"],
                "skipped": c["duplicates"] + c["other_model"] + c["rejected"] + c["pseudo_skipped"],
                "duplicates": c["duplicates"], "rollbacks": c["rollbacks"],
                "skipped_non_finite": c["skipped_non_finite"], "batches": c["batches"]},
        metrics=learner.summary(),
        drift_state=learner.drift_counts,
        feature_spec=list(learner.spec.features),
        architecture=learner.spec.to_dict(),
        weights=weights_info(weights, chunk_bytes),
    )


def servable_weights(state_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a serving node needs from the trainer state: the main model's
    parameters (``model.*``), the featurizer statistics and the target scaling."""
    out = {f"model.{k[len('main.model.'):]}": v for k, v in state_tensors.items() if k.startswith("main.model.")}
    out.update({k: v for k, v in state_tensors.items() if k.startswith("featurizer.")})
    out["target"] = state_tensors["target"]
    return out


def build_trainer(settings: Settings, *, metrics: Metrics | None = None, **kwargs: Any) -> Trainer:
    """The trainer the settings describe, with its drift detectors and policy."""
    monitor, policy = drift_from_settings(settings)
    return Trainer(settings, metrics=metrics, drift=monitor, policy=policy, **kwargs)


def drift_from_settings(settings: Settings) -> tuple[DriftMonitor | None, DriftPolicy]:
    """The default detectors (if drift detection is on) and the configured policy."""
    policy = DriftPolicy(
        challenger_on_warning=settings.trainer_drift_challenger_on_warning,
        on_drift=settings.trainer_drift_on_drift,
        lr_boost_factor=settings.trainer_drift_lr_boost_factor,
        lr_boost_steps=settings.trainer_drift_lr_boost_batches,
    )
    return (DriftMonitor.from_config(None) if settings.trainer_drift_enabled else None), policy
