"""The trainer role: the examples topic -> a learning session -> signed checkpoints, effectively once.

The trainer is a thin live driver of a
:class:`~stream_learner.learn.session.LearningSession` (which owns chunking,
the drift policy and the checkpoint order; see its module docstring). What
it injects:

* **records** from the examples topic, read by manual assignment, not
  through a consumer group: where it resumes comes from the session's saved
  position, never from offsets committed to Kafka (those are written for
  monitoring only, Flink's rule);
* **when to learn a partial chunk**: only once caught up (the broker holds
  nothing unread, not merely an empty poll) and ``trainer_max_wait_ms``
  after the oldest pending record arrived;
* the **model topic** as the output, and Kafka **sinks**: refused records to
  the dead-letter topic, drift events to the drift topic;
* the **wall clock** for ``trainer_checkpoint_every_s``.

Duplicate examples (the joiner is at least once) are dropped by example id
in the learner. Records of either layout of the examples topic are read (one
example each, or an example batch: one item per example, and a position that
may stop inside the record, resumed there on restart; see
:mod:`~stream_learner.learn.items`).

Given a :class:`~stream_learner.learn.ranks.RankGroup` the trainer is one
rank of a data-parallel group: it reads only its partitions, moves in
lockstep with the other ranks (:meth:`Trainer.step` becomes one round of
the group) and, unless it is rank 0, writes nothing (see
:mod:`~stream_learner.learn.ranks`).
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import torch

from ..bus import (
    KAFKA_ERRORS,
    RECORD_HEADROOM_BYTES,
    DeadLetter,
    DeadLetters,
    Producer,
    TopicPartition,
    make_consumer,
    make_producer,
)
from ..checkpoint.output import Output, TopicOutput, publish_transient
from ..checkpoint.signing import load_private_key
from ..checkpoint.state import Snapshot, StateStore
from ..config import Settings
from ..drift import Action, DriftFinding, drift_event
from ..errors import ConfigError, EventError
from ..events import CheckpointManifest, encode
from ..metrics import Metrics
from ..optimize.challenger import SessionChallenger, challenge_scores
from ..optimize.hook import SessionVariants
from ..util.retry import Retry, Stopped
from .build import build_learner, state_store
from .items import Item, Record, after, expand
from .learner import ChunkResult, OnlineLearner
from .ranks import RankGroup, assigned, check_world, pack_records, plan_steps, shares, unpack_records
from .session import CountingSinks, LearningSession, Sinks

log = structlog.get_logger(__name__)


class KafkaSinks:
    """Dead letters to the dead-letter topic, drift events to the drift topic (one producer).

    While the broker is unavailable, waiting for the dead letters is retried
    (``retry``), so a checkpoint waits for it rather than failing.
    """

    def __init__(self, settings: Settings, producer: Producer, metrics: Metrics, retry: Retry | None = None) -> None:
        self.settings = settings
        self.producer = producer
        self.metrics = metrics
        self.retry = retry or Retry("kafka (dead letters)")
        self.dead_letters = DeadLetters(producer, settings.topic_dlq, stage="trainer", metrics=metrics)
        self.pending: list[DeadLetter] = []  # dead letters not yet acknowledged
        self.drifts: list[tuple[bytes, bytes, Any]] = []  # drift events (key, value, future) not yet acknowledged

    def dead_letter(self, record: Record | None, error: EventError) -> None:
        """Send a refused record to the dead-letter topic (acknowledged by :meth:`flush`)."""
        if record is None:  # live examples always come as records
            log.warning("dead_letter_without_record", kind=error.kind, error=str(error))
            return
        self.pending.append(self.dead_letters.send(record, error))
        if len(self.pending) >= 1000:  # bounded: wait for these now rather than at the checkpoint
            self._wait()

    def drift(
        self, finding: DriftFinding, actions: Sequence[Action], *, event_time: int, model_version: int | None
    ) -> None:
        """Publish the finding's drift event, count and log it."""
        model = self.settings.trainer_model
        event = drift_event(finding, list(actions), model=model, event_time=event_time, model_version=model_version)
        key, value = model.encode(), encode(event)
        self.drifts.append((key, value, self.producer.send(self.settings.topic_drift, key=key, value=value)))
        if len(self.drifts) >= 1000:
            self._wait()
        self.metrics.trainer_drifts.labels(kind=finding.kind.value, detector=finding.detector).inc()
        log.warning(
            "drift",
            detector=finding.detector,
            signal=finding.signal,
            kind=finding.kind.value,
            index=finding.index,
            actions=event.actions,
        )

    def _wait(self) -> None:
        def acknowledged() -> None:
            for letter in self.pending:
                letter.get(timeout=60)  # sends again after a transient failure; None if unsendable
            for i, (key, value, future) in enumerate(self.drifts):
                try:
                    future.get(timeout=60)
                except KAFKA_ERRORS:
                    # Sent again; the retry awaits the new send (a transient error) or raises (a permanent one).
                    self.drifts[i] = (key, value, self.producer.send(self.settings.topic_drift, key=key, value=value))
                    raise

        self.retry.call(acknowledged)
        self.pending.clear()
        self.drifts.clear()

    def flush(self) -> None:
        """Every dead letter and drift event sent so far is acknowledged by the broker."""
        self.producer.flush()
        self._wait()


class Trainer:
    """One trainer process for one model, built from ``settings`` (drift detection as they say).

    ``run()`` loops; ``step()`` is one poll. ``on_checkpoint`` is called with
    every published manifest. ``stop`` ends the waits for a dependency that
    is down (the state store at start or at a checkpoint, the broker for dead
    letters): they raise :class:`~stream_learner.util.retry.Stopped`, which
    :meth:`run` takes as the end (the event :meth:`run` is given ends them
    too); a start abandoned that way raises it from the constructor.
    ``group`` makes it one rank of a data-parallel group (module docstring).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        store: StateStore | None = None,
        poll_timeout_ms: int = 100,
        on_checkpoint: Callable[[CheckpointManifest], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
        group: RankGroup | None = None,
    ) -> None:
        if not settings.trainer_signing_key:
            raise ConfigError(
                "trainer_signing_key is not set: the trainer signs every checkpoint "
                "(generate one with `stream-learner keys generate`)"
            )
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stop = stop or threading.Event()
        torch.set_num_threads(settings.trainer_torch_threads)
        private_key = load_private_key(settings.trainer_signing_key)
        self.group = group if group is not None and group.world > 1 else None
        lead = self.group is None or self.group.lead  # the one process that writes
        learner, policy = build_learner(settings, self.group)
        self.poll_timeout_ms = poll_timeout_ms
        self.on_checkpoint = on_checkpoint
        self.clock = clock
        self.topic = settings.topic_examples
        self.consumer = make_consumer(settings, group_id=settings.trainer_group_id)
        # One producer for checkpoint chunks and dead letters: room for the larger of the two.
        self.producer = (
            make_producer(
                settings,
                max_request_size=max(settings.trainer_chunk_bytes, settings.max_event_bytes) + RECORD_HEADROOM_BYTES,
            )
            if lead
            else None
        )
        output: Output = RankOutput()
        sinks: Sinks = CountingSinks()
        if self.producer is not None:
            output = TopicOutput(
                settings, settings.trainer_model, private_key, producer=self.producer, retry=self._publish_retry()
            )
            sinks = KafkaSinks(
                settings,
                self.producer,
                self.metrics,
                Retry("kafka (dead letters)", stop=self.stop, on_retry=self._retrying("kafka")),
            )
            store = store or state_store(settings, stop=self.stop, on_retry=self._retrying("redis"))
        else:
            store = RankStore()  # another rank's state is rank 0's: only rank 0 saves
        self.session = LearningSession(
            learner,
            policy,
            model=settings.trainer_model,
            output=output,
            store=store,
            sinks=sinks,
            chunk_size=settings.trainer_batch_size,
            checkpoint_every_examples=settings.trainer_checkpoint_every_examples,
            checkpoint_every_s=settings.trainer_checkpoint_every_s,
            chunk_bytes=settings.trainer_chunk_bytes,
            max_event_bytes=settings.max_event_bytes,
            full_every=settings.trainer_full_checkpoint_every,
            checkpoint_dtype=settings.trainer_checkpoint_dtype,
            clock=clock,
            on_published=self._published,
            on_chunk=self._chunk,
        )
        self.published: list[CheckpointManifest] = []
        self.pending_since = 0.0  # when the oldest pending record arrived
        self.held: list[Record] = []  # a rank's items read, not yet given to a global chunk
        # Per partition, (offset, examples of it read) of a batch record a restart resumes inside.
        self.resume: dict[TopicPartition, tuple[int, int]] = {}
        self.variants: SessionVariants | None = None
        self.challenger: SessionChallenger | None = None
        if self.producer is not None:
            producer = self.producer

            def output_for(name: str) -> TopicOutput:
                return TopicOutput(settings, name, private_key, producer=producer, retry=self._publish_retry())

            # Serving variants of every version (trainer_variants; stream_learner.optimize), if asked for.
            self.variants = SessionVariants.from_settings(settings, metrics=self.metrics, output_for=output_for)
            if self.variants is not None:
                self.variants.attach(self.session)
            # While a challenger runs, each version's challenger as <model>#challenger (shadow traffic).
            self.challenger = SessionChallenger(
                metrics=self.metrics, chunk_bytes=settings.trainer_chunk_bytes, output_for=output_for
            ).attach(self.session)
        self._restore()
        # torch (and torch._dynamo, which Adam imports) leave ~370k long-lived
        # objects; moved out of the collector's way, full collections stop
        # costing 7-21% of the trainer's time (bench/README.md).
        gc.freeze()

    @property
    def learner(self) -> OnlineLearner:
        """The session's learner."""
        return self.session.learner

    @property
    def version(self) -> int:
        """The last version checkpointed."""
        return self.session.version

    @property
    def buffer(self) -> list[Item]:
        """Records read and not learned yet."""
        return self.session.pending

    @property
    def offsets(self) -> dict[int, int]:
        """Per partition of the examples topic, the offset after the last record learned."""
        prefix = f"{self.topic}:"
        return {int(n[len(prefix) :]): o for n, o in self.session.applied_offsets().items() if n.startswith(prefix)}

    def _restore(self) -> None:
        partitions = sorted(self.consumer.partitions_for_topic(self.topic) or [0])
        group = self.group
        if group is not None:
            check_world(group.world, len(partitions), self.topic)
            partitions = assigned(partitions, group.rank, group.world)
        parts = [TopicPartition(self.topic, p) for p in partitions]
        self.consumer.assign(parts)
        if group is None:
            meta = self.session.restore(legacy_topic=self.topic)
        else:
            # Rank 0 reads the one snapshot (and the newest version published); every rank restores it.
            lead = self.session
            found = (lead.store.load(), lead.output.latest_version()) if group.lead else None
            snapshot, latest = group.broadcast(found)
            if isinstance(lead.output, RankOutput):
                lead.output.latest = latest
            meta = self.session.restore(snapshot=snapshot, legacy_topic=self.topic)
        if self.variants is not None:
            self.variants.restored(meta)
        if self.challenger is not None:
            self.challenger.restored(meta)
        position, inside = self.session.position, self.session.inside
        for tp in parts:
            name = f"{tp.topic}:{tp.partition}"
            if name in position:
                self.consumer.seek(tp, position[name])
                if inside.get(name):  # a batch record learned in part: its first examples are not read again
                    self.resume[tp] = (position[name], inside[name])
            else:
                self.consumer.seek_to_beginning(tp)
        log.info(
            "trainer_restored",
            version=self.version,
            position=position,
            pending=len(self.buffer),
            rank=None if group is None else group.rank,
            partitions=partitions,
        )

    # -- the loop --------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Train until ``stop`` is set, then close.

        A checkpoint still waiting for the state store when ``stop`` is set
        is abandoned (:class:`~stream_learner.util.retry.Stopped`): nothing
        of it was saved, so the next start resumes from the last one saved.
        """
        if stop is not None and stop is not self.stop:
            # The waits for a dependency watch self.stop: make this stop end them too.
            def relay(outer: threading.Event = stop) -> None:
                outer.wait()
                self.stop.set()

            threading.Thread(target=relay, name="trainer-stop", daemon=True).start()
        log.info("trainer_started", model=self.settings.trainer_model, version=self.version)
        try:
            if self.group is None:
                while not self.stop.is_set():
                    self.step()
            else:
                while self._round():  # every rank leaves at the same round
                    pass
        except Stopped as exc:
            log.warning("trainer_stopped_waiting", reason=str(exc))
        finally:
            self.close()

    def _publish_retry(self) -> Retry:
        """A checkpoint publish the broker fails transiently is published again (stoppably), not fatal."""
        return Retry(
            "kafka (checkpoint publish)", stop=self.stop, on_retry=self._retrying("kafka"), classify=publish_transient
        )

    def _retrying(self, dependency: str) -> Callable[[BaseException, float], None]:
        def counted(exc: BaseException, delay: float) -> None:
            self.metrics.trainer_retries.labels(dependency=dependency).inc()
            log.warning(
                "trainer_dependency_unavailable",
                dependency=dependency,
                error=f"{type(exc).__name__}: {exc}",
                retry_in_s=round(delay, 3),
            )

        return counted

    def step(self) -> int:
        """Poll once; learn every full chunk (and a partial one when caught up and waited)."""
        size = self.settings.trainer_batch_size
        batch = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=10 * size)
        session, n = self.session, 0
        for tp in sorted(batch, key=lambda t: t.partition):
            records = batch[tp]
            name = f"{tp.topic}:{tp.partition}"
            items = self._items(tp, records)
            # Slices that fill the pending chunk exactly (a per-record loop cost ~0.2 us per example):
            # a checkpoint after a chunk then saves no records of this poll, only the position (inside
            # a batch record, if the chunk ends there).
            start = 0
            while start < len(items):
                if not session.pending:
                    self.pending_since = self.clock()
                part = items[start : start + size - len(session.pending)]
                offset, read = after(part[-1])
                session.add(part, {name: offset}, {name: read} if read else None)
                session.learn()
                start += len(part)
            n += len(records)
        waited = (self.clock() - self.pending_since) * 1000 >= self.settings.trainer_max_wait_ms
        if n == 0 and session.pending and waited and self._caught_up():
            session.learn(partial=True)
        session.tick()
        self.metrics.observe_consumer("trainer", self.consumer)  # the lag gauge; progress for /health
        return n

    def _items(self, tp: TopicPartition, records: list[Any]) -> list[Any]:
        """The items (one per example) of one partition's polled records: a batch record's examples
        (stream_learner.learn.items.expand), less those of the first record a restart read already."""
        if not records:
            return records
        skip = self.resume.pop(tp, None) if self.resume else None
        if skip is not None and records[0].offset != skip[0]:
            # The record is gone (retention): its successor is read whole. Never for a record before it:
            # the consumer was seeked there.
            skip = None
        if skip is None and not any(r.headers for r in records):
            return records  # one example per record (the json format): as they are
        return expand(records, skip[1] if skip is not None else 0)

    def _round(self) -> bool:
        """One round of a data-parallel group (stream_learner.learn.ranks); False once a rank stops.

        Poll, say in one all-gather what this rank holds, plan the same steps as every rank, gather
        their records, and learn each global chunk whole.
        """
        group, session, settings = self.group, self.session, self.settings
        assert group is not None
        size = settings.trainer_batch_size
        share = shares(size, group.world)
        if len(self.held) < 10 * size:  # bounded: a rank far ahead of the others stops reading
            batch = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=10 * size)
            for tp in sorted(batch, key=lambda t: t.partition):
                if batch[tp] and not self.held:
                    self.pending_since = self.clock()
                self.held.extend(self._items(tp, batch[tp]))
        waited = (self.clock() - self.pending_since) * 1000 >= settings.trainer_max_wait_ms
        dry = self._caught_up() and (not self.held or waited)
        every = settings.trainer_checkpoint_every_s
        due = group.lead and every is not None and self.clock() - session.last_checkpoint >= every
        told = group.gather_ints([len(self.held), dry, self.stop.is_set(), due])
        if any(t[2] for t in told):
            self.stop.set()
            return False
        steps = plan_steps([t[0] for t in told], share, [bool(t[1]) for t in told])
        if steps:
            mine = sum(step[group.rank] for step in steps)
            given, self.held = self.held[:mine], self.held[mine:]
            if self.held:
                self.pending_since = self.clock()  # a bound on when the oldest held record arrived
            records = [unpack_records(b) for b in group.gather_bytes(pack_records(given))]
            at = [0] * group.world
            for step in steps:
                chunk: list[Record] = []
                for r, n in enumerate(step):
                    chunk.extend(records[r][at[r] : at[r] + n])
                    at[r] += n
                # Where each partition goes on after the chunk (its last item there; inside a batch
                # record when the chunk ends in one).
                ends = {f"{x.topic}:{x.partition}": after(x) for x in chunk}
                session.add(chunk, {n: o for n, (o, _) in ends.items()}, {n: i for n, (_, i) in ends.items() if i})
                session.learn(partial=True)  # exactly this chunk: the ranks' shares
        if told[0][3] and session.since_checkpoint:
            session.checkpoint()
        self.metrics.observe_consumer("trainer", self.consumer)
        return True

    def _caught_up(self) -> bool:
        """True when the broker holds nothing we have not read. An empty poll
        alone is not enough: a slow fetch would then cut a partial chunk mid
        stream, and chunk boundaries must depend on the stream only."""
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None or self.consumer.position(tp) < highwater:
                return False
        return True

    def _chunk(self, result: ChunkResult, n: int) -> None:
        self.metrics.trainer_examples.inc(n)
        if not math.isnan(result.loss):
            self.metrics.trainer_loss.set(result.loss)
        self.metrics.trainer_scores(self.settings.trainer_model, self.learner.summary)
        self.metrics.trainer_challenge(self.settings.trainer_model, lambda: challenge_scores(self.learner))

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint(self) -> CheckpointManifest:
        """Save the state, then publish it as the next version (the session's order)."""
        return self.session.checkpoint()

    def _published(self, signed: CheckpointManifest) -> None:
        self.published.append(signed)
        self.metrics.trainer_checkpoints.inc()
        self.metrics.trainer_version.set(signed.version)
        if self.producer is not None:  # rank 0 commits every partition's offsets; other ranks write nothing
            try:
                self.consumer.commit({TopicPartition(self.topic, p): o for p, o in self.offsets.items()})
            except Exception as exc:  # noqa: BLE001 - monitoring only; the state is what counts
                log.warning("trainer_commit_failed", error=str(exc))
        if self.on_checkpoint is not None:
            self.on_checkpoint(signed)

    def close(self) -> None:
        """Close the clients (state is saved at checkpoints only)."""
        try:
            self.session.close()
        except Stopped as exc:  # the broker is down at shutdown: dead letters since the last checkpoint
            log.warning("trainer_close_abandoned", reason=str(exc))  # are sent again by the next run
        if self.variants is not None:
            self.variants.close()
        if self.challenger is not None:
            self.challenger.close()
        self.consumer.close()  # never commits on close
        if self.producer is not None:
            self.producer.close()
        group = self.group
        shared = (
            {} if group is None else {"rank": group.rank, "all_reduces": group.reduces, "all_reduce_s": group.reduce_s}
        )
        log.info("trainer_stopped", version=self.version, counts=self.learner.counts, **shared)


class RankOutput:
    """The output of a rank other than 0: rank 0 publishes, this one only follows the version number."""

    def __init__(self) -> None:
        self.latest = 0

    def latest_version(self) -> int:
        """The newest version, as rank 0 found it at start and the group has checkpointed since."""
        return self.latest

    def publish(self, manifest: CheckpointManifest, weights: bytes) -> CheckpointManifest:
        """Nothing is written: rank 0 publishes the same version."""
        self.latest = manifest.version
        return manifest

    def close(self) -> None:
        """Nothing to release."""


class RankStore:
    """The state store of a rank other than 0: rank 0 saves the group's one snapshot."""

    def save(self, snapshot: Snapshot) -> None:
        """Nothing is written (every rank's state equals rank 0's)."""

    def load(self) -> Snapshot | None:
        """Never read: rank 0 broadcasts what it loads."""
        raise RuntimeError("a rank other than 0 reads no snapshot of its own")
