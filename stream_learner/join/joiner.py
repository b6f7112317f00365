"""The joiner role: predictions + labels -> joined examples, at least once, never losing a match.

Each cycle of :meth:`Joiner.step`, in this order:

1. poll a batch from the prediction and label topics (consumer group);
2. decode it; refused records are sent to the dead-letter topic;
3. one atomic Redis call (:class:`~stream_learner.join.store.RedisJoinStore`):
   acknowledge the previous cycle's emissions, advance the watermark, apply
   the events, close windows, collect state past retention, and, on start
   or when a lease ran out, claim emissions nobody acknowledged;
4. build the examples (deterministic example ids) and produce them with the
   idempotent producer; wait until the broker has all of them and the dead
   letters;
5. wait until Redis has the step in its append-only file;
6. commit the input offsets.

A crash anywhere re-delivers the uncommitted inputs, which have no second
effect on the state, and the outbox holds every emission not yet
acknowledged, which the restarted joiner emits again: the examples topic may
hold an example twice (same id), never miss one. If Redis or the broker is
unavailable the joiner pauses its partitions, keeps the batch, retries with
backoff without committing, and resumes when they are back.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from ..bus import DeadLetters, make_consumer, make_producer
from ..config import Settings
from ..errors import EventError
from ..events import (
    LABEL, PREDICTION, Codec, ExampleEvent, LabelEvent, PredictionEvent, Source, encode,
)
from ..metrics import Metrics
from ..redis_conn import make_redis
from .store import Emission, PartitionProgress, RedisJoinStore, StepResult, wall_ms

log = structlog.get_logger(__name__)


def example_id(kind: str, prediction_event_id: str, label_event_id: str | None) -> str:
    """The deterministic id of an example: the same inputs always give the same id.

    >>> example_id("labeled", "p-1", "l-1") == example_id("labeled", "p-1", "l-1")
    True
    >>> example_id("unlabeled", "p-1", None) != example_id("late", "p-1", "l-1")
    True
    """
    digest = hashlib.blake2b(f"{kind}\x1f{prediction_event_id}\x1f{label_event_id or ''}".encode(),
                             digest_size=16)
    return digest.hexdigest()


def source_string(topic: str, partition: int, offset: int) -> str:
    """How a record's origin is stored in the join state."""
    return f"{topic}/{partition}/{offset}"


def parse_source(text: str | None) -> Source | None:
    """The inverse of :func:`source_string` (topic names cannot contain ``/``)."""
    if not text:
        return None
    topic, partition, offset = text.rsplit("/", 2)
    return Source(topic, int(partition), int(offset))


def build_example(emission: Emission, prediction: PredictionEvent, label: LabelEvent | None) -> ExampleEvent:
    """The joined example for one emission."""
    return ExampleEvent(
        example_id=example_id(emission.kind, prediction.event_id, label.event_id if label else None),
        kind=emission.kind,  # type: ignore[arg-type]
        request_id=prediction.request_id,
        model=prediction.model,
        model_version=prediction.model_version,
        features=prediction.features,
        prediction=prediction.prediction,
        label=label.label if label else None,
        prediction_event_id=prediction.event_id,
        prediction_time=prediction.event_time,
        prediction_source=parse_source(emission.prediction_source),
        label_event_id=label.event_id if label else None,
        label_time=label.event_time if label else None,
        label_source=parse_source(emission.label_source),
    )


@dataclass
class JoinerCounts:
    """Running totals of one joiner process, also exported as metrics."""

    events: dict[str, int] = field(default_factory=lambda: {"prediction": 0, "label": 0})
    examples: dict[str, int] = field(default_factory=lambda: {"labeled": 0, "unlabeled": 0, "late": 0})
    duplicates: int = 0
    orphans_dropped: int = 0
    early_labels: int = 0
    dead_letters: int = 0
    polls: int = 0
    redis_calls: int = 0


class Joiner:
    """One joiner process. ``run()`` loops until ``stop`` is set; ``step()`` is one cycle.

    ``clock`` returns wall-clock milliseconds (injectable for tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        redis_client: redis.Redis | None = None,
        clock: Callable[[], int] = wall_ms,
        poll_timeout_ms: int = 200,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.poll_timeout_ms = poll_timeout_ms
        self.store = RedisJoinStore(redis_client or make_redis(settings), settings)
        self.counts = JoinerCounts()
        self.topics = {settings.topic_predictions: "prediction", settings.topic_labels: "label"}
        self.codecs: dict[str, Codec[Any]] = {
            settings.topic_predictions: Codec(PREDICTION.event_type, settings.max_event_bytes),
            settings.topic_labels: Codec(LABEL.event_type, settings.max_event_bytes),
        }
        self.consumer: KafkaConsumer = make_consumer(
            settings, group_id=settings.joiner_group_id, max_poll_records=settings.joiner_max_poll_records,
        )
        self.consumer.subscribe(list(self.topics))
        self.producer: KafkaProducer = make_producer(settings)
        self.dead_letters = DeadLetters(self.producer, settings.topic_dlq, stage="joiner")
        self._acks: list[str] = []
        # On start, claim every unacknowledged emission: a previous run of
        # this (or any) joiner may have died before producing it. Re-emitting
        # a live peer's emission only duplicates an example id, never loses one.
        self._claim_all = True
        self._next_claim = 0

    # -- the loop -------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Run cycles until ``stop`` is set, then acknowledge and close."""
        stop = stop or threading.Event()
        log.info("joiner_started", group=self.settings.joiner_group_id, topics=list(self.topics))
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> int:
        """One poll -> join -> produce -> commit cycle; return the records polled."""
        batch = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
        self.counts.polls += 1
        events: list[tuple[str, str, int, str, bytes]] = []
        max_times: dict[TopicPartition, int] = {}
        offsets: dict[TopicPartition, int] = {}
        dead: list[Any] = []
        for tp, records in batch.items():
            role = self.topics[tp.topic]
            codec = self.codecs[tp.topic]
            typ = "P" if role == "prediction" else "L"
            top = -1
            for record in records:
                try:
                    event = codec.decode(record.value)
                except EventError as exc:
                    dead.append(self.dead_letters.send(record, exc))
                    self.counts.dead_letters += 1
                    self.metrics.dead_letters.labels(stage="joiner", kind=exc.kind).inc()
                    continue
                events.append((typ, event.request_id, event.event_time,
                               source_string(tp.topic, tp.partition, record.offset), record.value))
                top = max(top, event.event_time)
            self.counts.events[role] += len(records)
            self.metrics.joiner_events.labels(topic=tp.topic).inc(len(records))
            max_times[tp] = top
            offsets[tp] = records[-1].offset + 1

        progress = self._progress(max_times)
        result = self._with_retry("redis", lambda: self._timed_step(progress, events))
        self._account(result)

        examples = [self._example(e) for e in result.emissions]
        self._with_retry("kafka", lambda: self._produce([x for x in examples if x is not None], dead))
        self._with_retry("redis", self.store.wait_durable)
        if offsets:
            self._commit(offsets)
        # Acknowledged at the next step, in the same Redis call: the broker has them now.
        self._acks = [e.member for e in result.emissions]
        self._observe(result.watermark)
        return sum(len(r) for r in batch.values())

    def close(self) -> None:
        """Acknowledge what was emitted, then close the clients."""
        try:
            if self._acks:
                self.store.step(progress=[], acks=self._acks, events=[], now_ms=self.clock())
                self._acks = []
        except redis.RedisError as exc:
            log.warning("joiner_final_ack_failed", error=str(exc))  # the outbox re-emits them
        self.consumer.close(autocommit=False)
        self.producer.close()
        log.info("joiner_stopped", counts=self.counts.__dict__)

    # -- parts of a step --------------------------------------------------------

    def _progress(self, max_times: dict[TopicPartition, int]) -> list[PartitionProgress]:
        progress = []
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except KafkaError:
                position = None
            caught_up = highwater is not None and position is not None and position >= highwater
            progress.append(PartitionProgress(f"{tp.topic}:{tp.partition}", max_times.get(tp, -1), caught_up))
        return progress

    def _total_partitions(self) -> int:
        return sum(len(self.consumer.partitions_for_topic(t) or ()) for t in self.topics)

    def _timed_step(self, progress: list[PartitionProgress],
                    events: list[tuple[str, str, int, str, bytes]]) -> StepResult:
        now = self.clock()
        claim = -1
        if self._claim_all:
            claim = now + 1
        elif now >= self._next_claim:
            claim = now - self.settings.joiner_outbox_lease_ms
        start = time.perf_counter()
        # A call that failed may have run on the server all the same (a timeout
        # after execution), its emissions then sit unacknowledged in the
        # outbox: claim everything on the next try so they are not delayed.
        self._claim_all = True
        result = self.store.step(progress=progress, acks=self._acks, events=events, now_ms=now,
                                 claim_before_ms=claim, total_partitions=self._total_partitions())
        self._claim_all = False
        if claim >= 0:
            self._next_claim = now + self.settings.joiner_outbox_lease_ms
        self.metrics.joiner_redis_seconds.observe(time.perf_counter() - start)
        self.counts.redis_calls += 1
        self._acks = []  # applied atomically with the step
        return result

    def _example(self, emission: Emission) -> ExampleEvent | None:
        try:
            prediction = PREDICTION.decode(emission.prediction)
            label = LABEL.decode(emission.label) if emission.label else None
        except EventError as exc:
            # Stored payloads were valid when stored; only a schema change can get here.
            log.error("joiner_stored_payload_invalid", request_id=emission.request_id, error=str(exc))
            return None
        return build_example(emission, prediction, label)

    def _produce(self, examples: list[ExampleEvent], dead: list[Any]) -> None:
        topic = self.settings.topic_examples
        futures = [self.producer.send(topic, key=x.request_id.encode(), value=encode(x)) for x in examples]
        self.producer.flush()
        for future in futures + dead:
            future.get(timeout=60)  # raises if the broker refused: retried, nothing committed

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        start = time.perf_counter()
        try:
            self._with_retry("kafka", lambda: self.consumer.commit(
                {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}))
        except CommitFailedError as exc:
            # Our partitions moved to another joiner; it re-reads these inputs,
            # which have no second effect, and our examples are already out.
            log.warning("joiner_commit_failed_rebalanced", error=str(exc))
        self.metrics.kafka_commit_seconds.observe(time.perf_counter() - start)

    def _with_retry(self, what: str, action: Callable[[], Any]) -> Any:
        """Run ``action`` until it succeeds; while it fails, pause consumption and back off."""
        backoff = 0.1
        paused = False
        while True:
            try:
                result = action()
            except CommitFailedError:
                raise
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                    redis.exceptions.TryAgainError, KafkaError) as exc:
                if not paused:
                    self.consumer.pause(*self.consumer.assignment())
                    paused = True
                self.metrics.joiner_retries.labels(dependency=what).inc()
                log.warning("joiner_dependency_unavailable", dependency=what, error=str(exc), retry_in_s=backoff)
                # Polling while paused keeps the group membership alive and returns nothing.
                self.consumer.poll(timeout_ms=int(backoff * 1000))
                backoff = min(backoff * 2, 5.0)
                continue
            if paused:
                self.consumer.resume(*self.consumer.paused())
                log.info("joiner_dependency_back", dependency=what)
            return result

    def _account(self, result: StepResult) -> None:
        c, m = self.counts, self.metrics
        c.duplicates += result.duplicates
        c.orphans_dropped += result.orphans_dropped
        c.early_labels += result.early_labels
        m.joiner_duplicates.inc(result.duplicates)
        m.joiner_joins.labels(kind="orphan_label_dropped").inc(result.orphans_dropped)
        m.joiner_joins.labels(kind="early_label").inc(result.early_labels)
        for e in result.emissions:
            c.examples[e.kind] += 1
            m.joiner_joins.labels(kind=e.kind).inc()

    def _observe(self, watermark: int) -> None:
        if watermark >= 0:
            self.metrics.joiner_watermark_lag.set(max(0, self.clock() - watermark) / 1000)
        lag = 0
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except KafkaError:
                continue
            if highwater is not None and position is not None:
                lag += max(0, highwater - position)
        self.metrics.joiner_consumer_lag.set(lag)
