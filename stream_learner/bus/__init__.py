"""The Kafka transport: one small interface every role, the SDK, serving and replay use.

Every role gets its producers, consumers and topic admin here, so security
settings (SSL, SASL PLAIN/SCRAM) apply everywhere without code changes, and
so the client library is a setting: ``kafka_client = "kafka-python"`` (the
default, :mod:`stream_learner.bus.kafka_python`) or ``"confluent"``
(librdkafka through confluent-kafka, the ``[confluent]`` extra,
:mod:`stream_learner.bus.confluent`). Nothing else in ``stream_learner``
imports a Kafka client.

The interface is the subset of kafka-python's API the roles use (so the
default backend is a thin wrapper): :class:`Consumer` (``assign``/
``subscribe``, ``poll`` -> ``{TopicPartition: [Record]}``, ``seek*``,
``position``, ``highwater``, ``commit`` of next-to-read offsets,
``committed``, ``end_offsets``/``beginning_offsets``,
``partitions_for_topic``, ``pause``/``resume``, ``close``),
:class:`Producer` (``send`` -> a future with ``get(timeout)``,
``add_callback``, ``add_errback``; ``flush``; ``close``) and admin
(:func:`list_topics`, :func:`ensure_topics`). Errors keep a backend's own
types, grouped here: :data:`KAFKA_ERRORS` (any Kafka error),
:data:`REBALANCED`, :data:`RECEIVE_TOO_LARGE`, :data:`RECORD_TOO_LARGE`;
:func:`kafka_error_kind` gives both backends the same transient/permanent
split (:mod:`stream_learner.util.retry` uses it). Options passed to
:func:`make_consumer`/:func:`make_producer` use kafka-python's names; the
confluent backend maps them to librdkafka's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

import structlog

from ..config import Settings
from ..errors import EventError, MissingTopicError, StreamLearnerError
from ..metrics import Metrics
from ..util.retry import is_transient
from . import kafka_python as _kp

log = structlog.get_logger(__name__)


class TopicPartition(NamedTuple):
    """A partition of a topic (equal to, and hashed as, kafka-python's and any ``(topic, partition)`` tuple)."""

    topic: str
    partition: int


class Record(NamedTuple):
    """One consumed record, as every backend gives it (kafka-python's ``ConsumerRecord`` has these fields).

    ``headers`` is a list of ``(str, bytes)``; ``timestamp`` is in ms since the epoch.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int


class Consumer(Protocol):
    """What a role may do with a consumer (see the module docstring); no backend auto-commits."""

    client: str

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[list[Any]], None] | None = None,
        on_revoke: Callable[[list[Any]], None] | None = None,
    ) -> None: ...
    def assign(self, partitions: Iterable[Any]) -> None: ...
    def assignment(self) -> set[Any]: ...
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]: ...
    def seek(self, partition: Any, offset: int) -> None: ...
    def seek_to_beginning(self, *partitions: Any) -> None: ...
    def seek_to_end(self, *partitions: Any) -> None: ...
    def position(self, partition: Any, timeout_ms: int | None = None) -> int: ...
    def highwater(self, partition: Any) -> int | None: ...
    def commit(self, offsets: Mapping[Any, int]) -> None: ...
    def committed(self, partition: Any) -> int | None: ...
    def end_offsets(self, partitions: Iterable[Any]) -> dict[Any, int]: ...
    def beginning_offsets(self, partitions: Iterable[Any]) -> dict[Any, int]: ...
    def offsets_for_times(self, timestamps: Mapping[Any, int], timeout_ms: int = 30_000) -> dict[Any, int | None]: ...
    def partitions_for_topic(self, topic: str) -> set[int] | None: ...
    def pause(self, *partitions: Any) -> None: ...
    def resume(self, *partitions: Any) -> None: ...
    def paused(self) -> set[Any]: ...
    def connected(self) -> bool: ...
    def close(self) -> None: ...


class Producer(Protocol):
    """What a role may do with a producer: idempotent, acks=all on every backend."""

    client: str
    max_request_size: int

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Any: ...
    def partitions_for(self, topic: str) -> set[int]: ...
    def flush(self, timeout: float | None = None) -> None: ...
    def close(self, timeout: float | None = None) -> None: ...


class TransportError(StreamLearnerError):
    """An error of the confluent backend (kafka-python's keep their own types).

    ``kind`` is ``transient``, ``authentication``, ``authorization`` or
    ``permanent``; ``code`` librdkafka's error name.
    """

    def __init__(self, message: str, *, kind: str = "permanent", code: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.retriable = kind == "transient"


class RebalancedError(TransportError):
    """A commit refused because the group moved on (the partitions went to another member)."""


class ReceiveTooLargeError(TransportError):
    """A fetch response larger than the consumer's receive limit."""


class RecordTooLargeError(TransportError):
    """A record the producer or the broker refuses as too large."""


class KafkaTimeoutError(TransportError):
    """A request that did not complete in time (transient)."""


#: Any Kafka error of either backend; the groups below are parts of it.
KAFKA_ERRORS: tuple[type[Exception], ...] = (_kp.KAFKA_ERROR, TransportError)
#: A commit refused after a rebalance: the next owner re-reads those inputs.
REBALANCED: tuple[type[Exception], ...] = (*_kp.REBALANCED, RebalancedError)
#: A fetch response over the receive limit (a partition stuck on a huge record).
RECEIVE_TOO_LARGE: tuple[type[Exception], ...] = (*_kp.RECEIVE_TOO_LARGE, ReceiveTooLargeError)
#: A record refused as too large (by the producer or by the broker).
RECORD_TOO_LARGE: tuple[type[Exception], ...] = (*_kp.RECORD_TOO_LARGE, RecordTooLargeError)
#: A request that timed out.
TIMEOUT: tuple[type[Exception], ...] = (*_kp.TIMEOUT, KafkaTimeoutError)


def kafka_error_kind(exc: BaseException) -> str | None:
    """``transient``, ``authentication``, ``authorization`` or ``permanent`` for a Kafka error; None otherwise.

    >>> from kafka import errors
    >>> kafka_error_kind(errors.KafkaTimeoutError()), kafka_error_kind(errors.TopicAuthorizationFailedError())
    ('transient', 'authorization')
    >>> kafka_error_kind(RebalancedError("x")), kafka_error_kind(ValueError("x")) is None
    ('permanent', True)
    """
    if isinstance(exc, TransportError):
        return exc.kind
    return _kp.error_kind(exc)


#: Dead-letter headers: where the record came from and why it was refused.
H_SOURCE_TOPIC = "sl-source-topic"
H_SOURCE_PARTITION = "sl-source-partition"
H_SOURCE_OFFSET = "sl-source-offset"
#: The example's index inside its source record, for one example of an example batch dead-lettered alone.
H_SOURCE_INDEX = "sl-source-index"
H_ERROR_KIND = "sl-error-kind"
H_ERROR_FIELD = "sl-error-field"
H_ERROR_MESSAGE = "sl-error-message"
H_STAGE = "sl-stage"


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Connection and security options shared by every client, in kafka-python's names.

    They are the interface's option names: the confluent backend maps them to librdkafka's.

    >>> opts = kafka_options(Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
    ...                               sasl_username="u", sasl_password="p"))
    >>> opts["security_protocol"], opts["sasl_mechanism"], opts["sasl_plain_username"]
    ('SASL_SSL', 'SCRAM-SHA-512', 'u')
    """
    return _kp.options(settings)


def key_partition(key: bytes, partitions: Iterable[int]) -> int:
    """The partition Kafka's Java client (and kafka-python) give ``key`` among ``partitions``: murmur2.

    A rule of the data, not of the client: librdkafka's default partitioner hashes otherwise, so a
    writer that must place records by key on either backend (the joiner's example batches) names
    the partition this gives.

    >>> key_partition(b"req-1", {0}), [key_partition(f"req-{i}".encode(), range(3)) for i in range(6)]
    (0, [0, 2, 2, 2, 0, 1])
    """
    ordered = sorted(partitions)
    return ordered[(int(_kp.murmur2(key)) & 0x7FFFFFFF) % len(ordered)]


#: Room above ``max_event_bytes`` in a producer's ``max_request_size``: an event at the limit, as a
#: dead letter with its headers (or as the example that carries it), still fits.
RECORD_HEADROOM_BYTES = 64 * 1024


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent, acks=all producer: retries never duplicate or reorder a partition.

    Its ``max_request_size`` is ``max_event_bytes`` plus :data:`RECORD_HEADROOM_BYTES`:
    what a role produces is at most an event and some lineage or headers. A
    larger dead letter is sent truncated (:class:`DeadLetters`).
    ``overrides`` are kafka-python option names (mapped for librdkafka).
    """
    opts = {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": settings.max_event_bytes + RECORD_HEADROOM_BYTES,
        **kafka_options(settings),
        **overrides,
    }
    if getattr(settings, "kafka_client", "kafka-python") == "confluent":
        from .confluent import Producer as ConfluentProducer

        return ConfluentProducer(settings, opts)
    return _kp.Producer(opts)


def make_consumer(settings: Settings, group_id: str | None, **overrides: Any) -> Consumer:
    """A consumer that never auto-commits: each role commits after its output is durable.

    ``overrides`` are kafka-python option names (mapped for librdkafka).
    """
    opts = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": 5000,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "session_timeout_ms": settings.consumer_session_timeout_ms,
        "heartbeat_interval_ms": min(3000, settings.consumer_session_timeout_ms // 3),
        "max_poll_interval_ms": settings.consumer_max_poll_interval_ms,
        "fetch_max_wait_ms": settings.consumer_fetch_max_wait_ms,
        **kafka_options(settings),
        **overrides,
    }
    if getattr(settings, "kafka_client", "kafka-python") == "confluent":
        from .confluent import Consumer as ConfluentConsumer

        return ConfluentConsumer(settings, opts)
    return _kp.Consumer(opts)


class Admin(Protocol):
    """Topic admin: list and create."""

    def list_topics(self) -> set[str]: ...
    def create_topics(self, topics: list[tuple[str, int, int, dict[str, str] | None]], timeout_s: float) -> None: ...
    def close(self) -> None: ...


def make_admin(settings: Settings, timeout_s: float = 30.0) -> Admin:
    """An admin client of the configured backend (raises a Kafka error if the brokers cannot be reached)."""
    if getattr(settings, "kafka_client", "kafka-python") == "confluent":
        from .confluent import Admin as ConfluentAdmin

        admin: Admin = ConfluentAdmin(settings, timeout_s)
        return admin
    return _kp.Admin(_kp.options(settings), timeout_s)


def _admin(settings: Settings, timeout_s: float) -> Admin:
    try:
        return make_admin(settings, timeout_s)
    except KAFKA_ERRORS as exc:
        raise StreamLearnerError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc!r}") from None


def list_topics(settings: Settings, timeout_s: float = 30.0) -> set[str]:
    """The names of the topics the brokers have (raises a Kafka error if they cannot be reached)."""
    admin = make_admin(settings, timeout_s)
    try:
        return admin.list_topics()
    finally:
        admin.close()


def ensure_topics(settings: Settings, *, roles: Iterable[str] | None = None, timeout_s: float = 30.0) -> list[str]:
    """Create the topics of docs/architecture.md (of ``roles`` only, if given) that do not exist yet.

    Returns those created. Input topics get ``partitions_input`` partitions;
    the examples topic ``partitions_examples``; model, drift and dead-letter
    topics one each (the model topic is read in version order).
    The input, examples and dead-letter topics get ``max.message.bytes`` =
    ``max_event_bytes`` + :data:`RECORD_HEADROOM_BYTES`.
    """
    partitions = {
        "predictions": settings.partitions_input,
        "labels": settings.partitions_input,
        "examples": settings.partitions_examples,
    }
    wanted_roles = set(settings.topics if roles is None else roles)
    # Topics that carry events (or an example of one, or a dead letter with its headers) take records
    # of max_event_bytes and some room: Apache Kafka's default max.message.bytes (1,048,588) is just
    # above the default max_event_bytes (1 MiB), too little for an event at the limit with its lineage.
    large = {"max.message.bytes": str(settings.max_event_bytes + RECORD_HEADROOM_BYTES)}
    configs = {"predictions": large, "labels": large, "examples": large, "dlq": large}
    admin = _admin(settings, timeout_s)
    try:
        existing = admin.list_topics()
        wanted = [
            (name, partitions.get(role, 1), settings.replication_factor, configs.get(role))
            for role, name in settings.topics.items()
            if role in wanted_roles and name not in existing
        ]
        if wanted:
            admin.create_topics(wanted, timeout_s)
        return [name for name, *_ in wanted]
    finally:
        admin.close()


def check_topics(settings: Settings, roles: Iterable[str], *, who: str, timeout_s: float = 30.0) -> list[str]:
    """At a role's start: make sure the topics of ``roles`` exist; return the ones created.

    Some brokers create a topic the first time a client names it, with the
    broker's defaults (one partition, ``cleanup.policy`` as configured): a
    misspelt name would then be a silent new topic. So the existing topics
    are listed (a request that creates nothing), and a missing one is created
    only when ``create_topics`` is on (as ``topics create`` would); otherwise
    :class:`~stream_learner.errors.MissingTopicError` names it.
    """
    roles = list(roles)
    if settings.create_topics:
        created = ensure_topics(settings, roles=roles, timeout_s=timeout_s)
        if created:
            log.info("topics_created", topics=created)
        return created
    admin = _admin(settings, timeout_s)
    try:
        existing = admin.list_topics()
    finally:
        admin.close()
    missing = [f"{name} ({role})" for role, name in settings.topics.items() if role in roles and name not in existing]
    if missing:
        raise MissingTopicError(
            f"the {who} needs topics that do not exist on {settings.bootstrap_servers}: {', '.join(missing)}; "
            "create them with `stream-learner topics create` (or set create_topics=true to let the roles "
            "create missing topics)"
        )
    return []


def dead_letter_headers(
    error: EventError | Exception, *, topic: str, partition: int, offset: int, stage: str, index: int | None = None
) -> list[tuple[str, bytes]]:
    """The headers that say where a dead letter came from and why it was refused.

    ``index`` is the example's place inside its source record when that record is an example batch
    and this example alone is refused (``sl-source-index``).

    >>> from stream_learner.errors import EventError
    >>> dict(dead_letter_headers(EventError("wrong_type", "$.features.x", "expected number"),
    ...                          topic="sl.predictions", partition=2, offset=41, stage="joiner"))[H_ERROR_FIELD]
    b'$.features.x'
    """
    kind = getattr(error, "kind", type(error).__name__)
    field = getattr(error, "field", "$")
    message = getattr(error, "reason", str(error))
    headers = [
        (H_SOURCE_TOPIC, topic.encode()),
        (H_SOURCE_PARTITION, str(partition).encode()),
        (H_SOURCE_OFFSET, str(offset).encode()),
        (H_ERROR_KIND, kind.encode()),
        (H_ERROR_FIELD, field.encode()),
        (H_ERROR_MESSAGE, message.encode()[:4096]),
        (H_STAGE, stage.encode()),
    ]
    if index is not None:
        headers.insert(3, (H_SOURCE_INDEX, str(index).encode()))
    return headers


#: Headers added when a dead letter's value had to be cut (see :class:`DeadLetters`).
H_TRUNCATED = "sl-truncated"
H_ORIGINAL_SIZE = "sl-original-size"
H_ORIGINAL_SHA256 = "sl-original-sha256"
H_ORIGINAL_KEY_SIZE = "sl-original-key-size"

#: What a truncated dead letter keeps of the value (and, when the key is also huge, of the key).
DEAD_LETTER_PREFIX_BYTES = 64 * 1024
DEAD_LETTER_KEY_BYTES = 1024
#: Bytes a record takes beyond its key, value and headers (record and batch framing), with room to spare.
_FRAMING_BYTES = 512

# A broker that refuses a record as too large (its message.max.bytes, the topic's max.message.bytes).
_TOO_LARGE = RECORD_TOO_LARGE


def _record_bytes(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers) + _FRAMING_BYTES


class DeadLetter:
    """One dead letter on its way: :meth:`get` waits until the broker has it.

    Never raises while sending. A record too large to carry whole (with its
    headers, larger than the producer's ``max_request_size``, or refused by
    the broker as too large) goes truncated: the first
    :data:`DEAD_LETTER_PREFIX_BYTES` of its value, with headers
    ``sl-truncated: true``, ``sl-original-size`` and ``sl-original-sha256``
    (of the whole value). If the broker refuses even that, or refuses for a
    reason waiting cannot cure (authorization, an invalid topic), the letter
    is *unsendable*: counted, logged once at error level, and :meth:`get`
    returns ``None``, so the caller moves on rather than stopping for good.
    A transient error (the broker unavailable) is raised by :meth:`get`;
    calling :meth:`get` again sends again, so a caller's retry loop works.
    """

    def __init__(self, owner: DeadLetters, record: Any, error: Exception) -> None:
        self.owner = owner
        self.record = record
        self.headers = dead_letter_headers(
            error,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=owner.stage,
            index=getattr(record, "batch_index", None),  # one example of a batch (learn.items.BatchedExample)
        )
        self.key: bytes | None = record.key
        self.value: bytes | None = record.value
        self.truncated = False
        self.result: Any = None
        self.done = False
        self._future: Any = None
        self._error: BaseException | None = None
        if _record_bytes(self.key, self.value, self.headers) > owner.max_record_bytes:
            self._truncate()  # the producer would refuse it whole
        self._send()

    def _truncate(self) -> None:
        value = self.record.value or b""
        key = self.record.key
        headers = [
            *self.headers,
            (H_TRUNCATED, b"true"),
            (H_ORIGINAL_SIZE, str(len(value)).encode()),
            (H_ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode()),
        ]
        if key is not None and len(key) > DEAD_LETTER_KEY_BYTES:
            headers.append((H_ORIGINAL_KEY_SIZE, str(len(key)).encode()))
            key = key[:DEAD_LETTER_KEY_BYTES]
        self.key, self.value, self.headers = key, value[:DEAD_LETTER_PREFIX_BYTES], headers
        self.truncated = True
        self.owner.truncated(self)

    def _send(self) -> None:
        """Hand the letter to the producer; what goes wrong is kept for :meth:`get`."""
        self._error = None
        try:
            self._future = self.owner.producer.send(
                self.owner.topic, key=self.key, value=self.value, headers=self.headers
            )
        except Exception as exc:  # noqa: BLE001 - a dead letter never raises on the way out
            self._future = None
            self._error = exc

    def get(self, timeout: float | None = 60.0) -> Any:
        """The broker's acknowledgement (record metadata), or ``None`` if the letter is unsendable.

        Raises a transient error (broker unavailable, a timeout) as it is;
        the next call sends again.
        """
        while not self.done:
            if self._future is None and self._error is None:
                self._send()
            try:
                if self._error is not None:
                    raise self._error
                self.result = self._future.get(timeout=timeout)
                self.done = True
            except _TOO_LARGE as exc:
                if self.truncated:
                    self._unsendable(exc)
                else:
                    self._truncate()
                    self._send()
            except Exception as exc:
                if is_transient(exc):
                    self._future, self._error = None, None  # sent again by the next call
                    raise
                self._unsendable(exc)
        return self.result

    def _unsendable(self, exc: BaseException) -> None:
        record, value = self.record, self.record.value or b""
        log.error(
            "dead_letter_unsendable",
            stage=self.owner.stage,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            size=len(value),
            sha256=hashlib.sha256(value).hexdigest(),
            kind=dict(self.headers).get(H_ERROR_KIND, b"").decode(),
            error=f"{type(exc).__name__}: {exc}",
            consequence="the record is skipped; it stays in its source topic at that offset",
        )
        if self.owner.metrics is not None:
            self.owner.metrics.dead_letters_unsendable.labels(stage=self.owner.stage).inc()
        self.result, self.done = None, True


class DeadLetters:
    """Sends refused records to the dead-letter topic, byte for byte whenever they fit.

    The original key and value are kept so nothing is lost; the reason is in
    the headers. :meth:`send` returns a :class:`DeadLetter` whose ``get``
    returns when the broker has the record, so a caller commits its input
    offset only after that; too large a record goes truncated, and one the
    broker will not take at all is counted and skipped (see
    :class:`DeadLetter`). Each dead letter is counted in
    ``stream_learner_dead_letters_total{stage,kind}`` when ``metrics`` is
    given. The producer's ``max_request_size`` bounds a whole record (one
    from :func:`make_producer` takes an event of ``max_event_bytes`` and the
    headers).
    """

    def __init__(self, producer: Producer | Any, topic: str, stage: str, metrics: Metrics | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.stage = stage
        self.metrics = metrics
        limit = getattr(producer, "max_request_size", None)
        config = getattr(producer, "config", None)  # a bare kafka-python producer (or a fake of one)
        if not isinstance(limit, int):
            limit = int(config["max_request_size"]) if isinstance(config, dict) else 1 << 62
        self.max_record_bytes = limit

    def send(self, record: Any, error: Exception) -> DeadLetter:
        """Dead-letter one consumed :class:`Record`; never raises (see :class:`DeadLetter`)."""
        log.warning(
            "dead_letter",
            stage=self.stage,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=str(error)[:1000],
        )
        if self.metrics is not None:
            kind = getattr(error, "kind", type(error).__name__)
            self.metrics.dead_letters.labels(stage=self.stage, kind=kind).inc()
        return DeadLetter(self, record, error)

    def truncated(self, letter: DeadLetter) -> None:
        """Count (and log) a letter sent with its value cut."""
        log.warning(
            "dead_letter_truncated",
            stage=self.stage,
            topic=letter.record.topic,
            partition=letter.record.partition,
            offset=letter.record.offset,
            size=len(letter.record.value or b""),
            kept=len(letter.value or b""),
        )
        if self.metrics is not None:
            self.metrics.dead_letters_truncated.labels(stage=self.stage).inc()
