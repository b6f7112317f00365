"""The joiner role: predictions + labels -> joined examples, at least once, never losing a match.

Each cycle of :meth:`Joiner.step`, in this order:

1. poll a batch from the prediction and label topics (consumer group);
2. decode it; refused records are sent to the dead-letter topic;
3. send one atomic Redis call (:class:`~stream_learner.join.store.RedisJoinStore`),
   with ``WAITAOF`` right behind it on the same connection: acknowledge the
   outbox entries whose examples the broker already has, advance the
   watermark, apply the events, close windows, collect state past retention,
   record this call's emissions as one outbox entry, and, on start, after a
   failed call or when a lease ran out, claim entries nobody acknowledged;
4. while Redis runs it, finish the *previous* cycle: wait until its Redis
   call is durable (read its ``WAITAOF`` reply; if that reply is lost, run
   the call again, durably), build its examples (deterministic example ids)
   and produce them with the idempotent producer (one record each, or with
   ``examples_format = "batch"`` one example-batch record per examples
   partition, :mod:`stream_learner.events.batch`), wait until the broker has
   all of them and the dead letters, then commit that cycle's input offsets;
5. read this call's reply: its emissions are produced in the next cycle, and
   its outbox entry is acknowledged by the call after that.

So a batch's input offsets are committed only after its Redis call is
durable and its examples are acknowledged by the broker, and an outbox entry
is acknowledged only after the broker has its examples. When the previous
cycle left something to produce, step 1 does not wait for records (a poll
with no timeout), so an idle joiner produces its last examples at once.
:meth:`Joiner.close` finishes the last cycle and acknowledges it.

A crash anywhere re-delivers the uncommitted inputs, which have no second
effect on the state, and the outbox holds every emission not yet
acknowledged, which the restarted joiner emits again: the examples topic may
hold an example twice (same id), never miss one. If Redis or the broker is
unavailable the joiner pauses its partitions, keeps the batch, retries with
backoff without committing, and resumes when they are back.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from ..bus import (
    KAFKA_ERRORS,
    REBALANCED,
    RECORD_HEADROOM_BYTES,
    Consumer,
    DeadLetters,
    Producer,
    TopicPartition,
    key_partition,
    make_consumer,
    make_producer,
)
from ..config import Settings
from ..errors import EventError
from ..events import LABEL, PREDICTION, Codec, Source
from ..events.batch import BATCH_HEADERS, BATCH_TARGET_BYTES, split_batches
from ..metrics import Metrics
from ..redis_conn import make_redis
from ..util.retry import Retry, is_transient
from .examples import encode_example
from .records import Emission, pack_label, pack_prediction
from .store import JoinInput, PartitionProgress, RedisJoinStore, StepResult, wall_ms

log = structlog.get_logger(__name__)


# REBALANCED (from the bus): a commit the group refuses because it is rebalancing or has moved on
# without us; not an error of ours (either client raises one, depending on when the rebalance is seen).


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


@dataclass
class _Call:
    """One Redis join step: what it sends, and whether it is on the wire."""

    progress: list[PartitionProgress]
    events: list[JoinInput]
    acks: list[str]
    sent: bool = False
    now: int = 0
    claim: int = -1
    started: float = 0.0


@dataclass
class _Output:
    """What a cycle leaves for the next one: examples to produce, offsets to commit after them.

    ``call`` is the Redis step that made it, to run again if its durability
    cannot be confirmed.
    """

    emissions: list[Emission]
    tokens: list[str]
    dead: list[Any]
    offsets: dict[TopicPartition, int]
    call: _Call | None = None

    def __bool__(self) -> bool:
        return bool(self.emissions or self.tokens or self.dead or self.offsets)


#: What a batch record takes beyond its value: the record's framing and the sl-format header, with room.
_BATCH_MARGIN = 1024

#: Longest slice of a wait for a dependency: a stop is honoured within it.
WAIT_SLICE_S = 0.5


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
        self.stop = threading.Event()  # run()'s; ends a wait for a dependency at once
        self.store = RedisJoinStore(redis_client or make_redis(settings, settings.joiner_redis_prefix), settings)
        self.counts = JoinerCounts()
        self.topics = {settings.topic_predictions: "prediction", settings.topic_labels: "label"}
        self.codecs: dict[str, Codec[Any]] = {
            settings.topic_predictions: Codec(PREDICTION.event_type, settings.max_event_bytes),
            settings.topic_labels: Codec(LABEL.event_type, settings.max_event_bytes),
        }
        self.consumer: Consumer = make_consumer(
            settings,
            group_id=settings.joiner_group_id,
            max_poll_records=settings.joiner_max_poll_records,
        )
        self.consumer.subscribe(list(self.topics))
        self.producer: Producer = make_producer(settings)
        self.dead_letters = DeadLetters(self.producer, settings.topic_dlq, stage="joiner", metrics=self.metrics)
        # A batch record stays under the producer's and the topic's limit (an event and its room, less
        # the record's framing and headers) and under the target size.
        self.batch_bytes = min(BATCH_TARGET_BYTES, settings.max_event_bytes + RECORD_HEADROOM_BYTES - _BATCH_MARGIN)
        # Outbox tokens whose examples the broker has: acknowledged by the next Redis call.
        self._acks: list[str] = []
        # The last cycle's output: produced and committed while the next Redis call runs.
        self._output: _Output | None = None
        # On start, claim every unacknowledged outbox entry: a previous run of
        # this (or any) joiner may have died before producing it. Re-emitting
        # a live peer's emission only duplicates an example id, never loses one.
        # Claiming everything means the entries leased before this moment (the
        # entries a claim re-leases are then not claimed again).
        self._claim_all = True
        self._claim_from: int | None = None
        self._next_claim = 0

    # -- the loop -------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Run cycles until ``stop`` is set, then produce what is left, acknowledge and close."""
        stop = self.stop = stop or self.stop
        log.info("joiner_started", group=self.settings.joiner_group_id, topics=list(self.topics))
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> int:
        """One cycle (see the module docstring); return the records polled."""
        previous = self._output
        # With examples still to produce, do not wait for records: produce them now.
        batch = self.consumer.poll(timeout_ms=0 if previous else self.poll_timeout_ms)
        self.counts.polls += 1
        events, max_times, offsets, dead = self._decode(batch)
        call = _Call(self._progress(max_times), events, self._acks)
        self._acks = []
        try:
            self._send(call)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Sent again, with backoff, when its reply is awaited.
        # Redis runs this cycle's call meanwhile.
        confirmed = bool(previous) and self._confirm()
        if previous and confirmed:
            self._finish(previous)
        self._output = None
        result = self._with_retry("redis", lambda: self._receive(call))
        self._account(result)
        if previous and not confirmed:
            self._redo(previous)
            self._finish(previous)
        self._output = _Output(result.emissions, result.tokens, dead, offsets, call)
        self._observe(result.watermark)
        return sum(len(r) for r in batch.values())

    def flush(self) -> None:
        """Finish the last cycle now: produce its examples and commit its offsets.

        :meth:`step` leaves that to the next cycle (it overlaps with the next
        Redis call); a caller that stops stepping for a while calls this first.
        """
        output, self._output = self._output, None
        if output:
            if not self._confirm():
                self._redo(output)
            self._finish(output)

    def close(self) -> None:
        """Produce and commit what the last cycles left, acknowledge it, then close the clients.

        Nothing here retries: what is not acknowledged stays in the outbox,
        and a joiner emits it again.
        """
        try:
            for _ in range(3):
                output, self._output = self._output, None
                if output:
                    if not self._confirm():
                        break
                    self._finish(output, retry=False)
                if not self._acks:
                    break
                # An acknowledging step with no events; it may still close windows (idle advance).
                result = self.store.step(progress=[], acks=self._acks, events=[], now_ms=self.clock(), durable=True)
                self._acks = []
                self._account(result)
                self._output = _Output(result.emissions, result.tokens, [], {})
        except (redis.RedisError, *KAFKA_ERRORS) as exc:  # type: ignore[misc]
            log.warning("joiner_final_ack_failed", error=str(exc))  # the outbox re-emits them
        self.store.close()
        self.consumer.close()
        self.producer.close(timeout=5)  # what it still holds is in the outbox: emitted again
        log.info("joiner_stopped", counts=self.counts.__dict__)

    # -- parts of a step --------------------------------------------------------

    def _decode(
        self, batch: dict[TopicPartition, list[Any]]
    ) -> tuple[list[JoinInput], dict[TopicPartition, int], dict[TopicPartition, int], list[Any]]:
        """Decode a poll: the join inputs, max event time and next offset per partition, dead-letter futures."""
        events: list[JoinInput] = []
        append = events.append
        max_times: dict[TopicPartition, int] = {}
        offsets: dict[TopicPartition, int] = {}
        dead: list[Any] = []
        for tp, records in batch.items():
            topic, partition = tp.topic, tp.partition
            role = self.topics[topic]
            decode = self.codecs[topic].decode
            typ, pack = ("P", pack_prediction) if role == "prediction" else ("L", pack_label)
            top = -1
            for record in records:
                try:
                    event = decode(record.value)
                except EventError as exc:
                    dead.append(self.dead_letters.send(record, exc))
                    self.counts.dead_letters += 1
                    continue
                t = event.event_time
                append((typ, event.request_id, t, pack(event, Source(topic, partition, record.offset))))
                if t > top:
                    top = t
            self.counts.events[role] += len(records)
            self.metrics.joiner_events.labels(topic=topic).inc(len(records))
            max_times[tp] = top
            offsets[tp] = records[-1].offset + 1
        return events, max_times, offsets, dead

    def _progress(self, max_times: dict[TopicPartition, int]) -> list[PartitionProgress]:
        progress = []
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except KAFKA_ERRORS:
                position = None
            # Caught up only once this process has read to the end it last fetched: a restarted
            # joiner (highwater unknown until its first fetch) starts with every partition active.
            caught_up = highwater is not None and position is not None and position >= highwater
            progress.append(
                PartitionProgress(f"{tp.topic}:{tp.partition}", max_times.get(tp, -1), caught_up, tp in max_times)
            )
        return progress

    def _total_partitions(self) -> int:
        return sum(len(self.consumer.partitions_for_topic(t) or ()) for t in self.topics)

    def _send(self, call: _Call, again: bool = False) -> None:
        """Send a Redis join step (and WAITAOF behind it) without waiting for the reply."""
        now = self.clock()
        claim = -1
        if self._claim_all:
            if self._claim_from is None:
                self._claim_from = now
            claim = self._claim_from
        elif now >= self._next_claim:
            claim = now - self.settings.joiner_outbox_lease_ms
        call.now, call.claim, call.started = now, claim, time.perf_counter()
        self.store.send(
            progress=call.progress,
            acks=call.acks,
            events=call.events,
            now_ms=now,
            claim_before_ms=claim,
            total_partitions=self._total_partitions(),
            durable=True,
            again=again,
        )
        call.sent = True

    def _receive(self, call: _Call) -> StepResult:
        """The reply of a sent step (sending it first if it is not on the wire); see :meth:`_confirm`."""
        if not call.sent:
            self._send(call, again=True)  # its first try may have run
        try:
            result = self.store.receive()
        except BaseException:
            # The call may have run on the server all the same (a timeout after
            # execution); its emissions then sit unacknowledged in the outbox:
            # claim everything on the next try so they are not delayed.
            call.sent = False
            self._claim_all, self._claim_from = True, None
            raise
        if result.more_to_claim:
            if not self._claim_all:
                self._next_claim = 0  # claim the rest with the next call
        else:
            self._claim_all, self._claim_from = False, None
            if call.claim >= 0:
                self._next_claim = call.now + self.settings.joiner_outbox_lease_ms
        self.metrics.joiner_redis_seconds.observe(time.perf_counter() - call.started)
        self.counts.redis_calls += 1
        return result

    def _confirm(self) -> bool:
        """Wait until the last cycle's Redis step is durable; False if that cannot be known."""
        try:
            self.store.wait_durable()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("joiner_step_durability_unknown", error=str(exc))
            return False
        return True

    def _redo(self, output: _Output) -> None:
        """Run a step whose durability is unknown again, durably, and add what it emits to ``output``.

        Its events have no second effect if the first run is in Redis; its
        outbox entry is then claimed (emitted twice: same example ids).
        """
        call = output.call
        if call is None:
            return
        redone = self._with_retry(
            "redis",
            lambda: self.store.step(
                progress=call.progress,
                acks=[],
                events=call.events,
                now_ms=self.clock(),
                claim_before_ms=call.now + 1,
                total_partitions=self._total_partitions(),
                durable=True,
                again=True,
            ),
        )
        self._account(redone)
        output.emissions = output.emissions + redone.emissions
        output.tokens = output.tokens + redone.tokens

    def _finish(self, output: _Output, retry: bool = True) -> None:
        """Produce a cycle's examples, commit its offsets, and queue its outbox tokens for acknowledgement."""
        if output.emissions or output.dead:
            examples = self._examples(output.emissions)
            if retry:
                self._with_retry("kafka", lambda: self._produce(examples, output.dead))
            else:
                self._produce(examples, output.dead)
        if output.offsets:
            self._commit(output.offsets, retry)
        # Acknowledged by the next Redis call: the broker has them now.
        self._acks += output.tokens

    def _examples(self, emissions: list[Emission]) -> list[tuple[bytes, bytes]]:
        """(key, value) of each emission's example: keyed by request id."""
        return [(e.prediction.request_id.encode(), encode_example(e)) for e in emissions]

    def _produce(self, examples: list[tuple[bytes, bytes]], dead: list[Any]) -> None:
        topic = self.settings.topic_examples
        send = self.producer.send
        futures: list[Any] = []
        if examples:
            partitions = self.producer.partitions_for(topic)
            if self.settings.examples_format == "batch":
                futures = [
                    send(topic, value=value, partition=partition, headers=BATCH_HEADERS)
                    for partition, value in self._batches(examples, partitions)
                ]
            else:
                # The default partitioner maps every key to the only partition of a
                # one-partition topic: name it, and skip the key hashing.
                only = next(iter(partitions)) if len(partitions) == 1 else None
                futures = [send(topic, key=key, value=value, partition=only) for key, value in examples]
        self.producer.flush()
        for future in futures + dead:
            future.get(timeout=60)  # raises if the broker refused: retried, nothing committed

    def _batches(self, examples: list[tuple[bytes, bytes]], partitions: set[int]) -> list[tuple[int, bytes]]:
        """(partition, value) of the example-batch records that carry ``examples`` (stream_learner.events.batch).

        A request's examples go to the partition Kafka's default partitioner
        gives its request id (:func:`~stream_learner.bus.key_partition`, murmur2,
        whichever client writes), in emission order; each partition's examples
        are split into records of at most :attr:`batch_bytes`.
        """
        if len(partitions) == 1:
            groups = {next(iter(partitions)): [value for _, value in examples]}
        else:
            ordered = sorted(partitions)
            groups = {}
            for key, value in examples:
                groups.setdefault(key_partition(key, ordered), []).append(value)
        return [(p, batch) for p, values in groups.items() for batch in split_batches(values, self.batch_bytes)]

    def _commit(self, offsets: dict[TopicPartition, int], retry: bool = True) -> None:
        start = time.perf_counter()

        def commit() -> None:
            self.consumer.commit(offsets)

        try:
            if retry:
                self._with_retry("kafka", commit)
            else:
                commit()
        except REBALANCED as exc:
            # Our partitions moved (or are moving) to another joiner; it re-reads these inputs,
            # which have no second effect, and our examples are already out. If they stay ours,
            # the next commit covers these offsets.
            log.warning("joiner_commit_failed_rebalanced", error=str(exc))
        self.metrics.kafka_commit_seconds.observe(time.perf_counter() - start)

    def _with_retry(self, what: str, action: Callable[[], Any]) -> Any:
        """Run ``action`` until it succeeds; while a transient error lasts, pause consumption and back off.

        A permanent error (wrong credentials, a missing ACL, TLS misconfigured,
        a commit refused after a rebalance) is raised at once;
        :class:`~stream_learner.util.retry.Stopped` ends a wait when ``stop`` is set.
        """
        paused = False

        def on_retry(exc: BaseException, delay: float) -> None:
            nonlocal paused
            if not paused:
                self.consumer.pause(*self.consumer.assignment())
                paused = True
            self.metrics.joiner_retries.labels(dependency=what).inc()
            log.warning("joiner_dependency_unavailable", dependency=what, error=str(exc), retry_in_s=round(delay, 3))

        def wait(delay: float) -> None:
            # Polling while paused keeps the group membership alive and returns nothing.
            end = time.monotonic() + delay
            while not self.stop.is_set() and (left := end - time.monotonic()) > 0:
                self.consumer.poll(timeout_ms=max(1, int(min(left, WAIT_SLICE_S) * 1000)))

        result = Retry(what, stop=self.stop, on_retry=on_retry, wait=wait).call(action)
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
        for kind, n in Counter(e.kind for e in result.emissions).items():
            c.examples[kind] += n
            m.joiner_joins.labels(kind=kind).inc(n)

    def _observe(self, watermark: int) -> None:
        if watermark >= 0:
            self.metrics.joiner_watermark_lag.set(max(0, self.clock() - watermark) / 1000)
        # The lag gauge, and this cycle's progress for /health.
        self.metrics.observe_consumer("joiner", self.consumer)
