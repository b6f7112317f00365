"""Kafka clients built from :class:`~stream_learner.config.Settings`, topic setup, dead letters.

Every role gets its producers and consumers here, so security settings
(SSL, SASL PLAIN/SCRAM) apply everywhere without code changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (
    InvalidRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)

from .config import Settings
from .errors import EventError, MissingTopicError, StreamLearnerError
from .metrics import Metrics
from .util.retry import is_transient

log = structlog.get_logger(__name__)

#: Dead-letter headers: where the record came from and why it was refused.
H_SOURCE_TOPIC = "sl-source-topic"
H_SOURCE_PARTITION = "sl-source-partition"
H_SOURCE_OFFSET = "sl-source-offset"
H_ERROR_KIND = "sl-error-kind"
H_ERROR_FIELD = "sl-error-field"
H_ERROR_MESSAGE = "sl-error-message"
H_STAGE = "sl-stage"


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Connection and security options shared by every kafka-python client.

    >>> opts = kafka_options(Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
    ...                               sasl_username="u", sasl_password="p"))
    >>> opts["security_protocol"], opts["sasl_mechanism"], opts["sasl_plain_username"]
    ('SASL_SSL', 'SCRAM-SHA-512', 'u')
    """
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        opts.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password,
        )
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_check_hostname"] = settings.ssl_check_hostname
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password"):
            if getattr(settings, key):
                opts[key] = getattr(settings, key)
    return opts


#: Room above ``max_event_bytes`` in a producer's ``max_request_size``: an event at the limit, as a
#: dead letter with its headers (or as the example that carries it), still fits.
RECORD_HEADROOM_BYTES = 64 * 1024


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """An idempotent, acks=all producer: retries never duplicate or reorder a partition.

    Its ``max_request_size`` is ``max_event_bytes`` plus :data:`RECORD_HEADROOM_BYTES`:
    what a role produces is at most an event and some lineage or headers. A
    larger dead letter is sent truncated (:class:`DeadLetters`).
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
    return KafkaProducer(**opts)


def make_consumer(settings: Settings, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer that never auto-commits: each role commits after its output is durable."""
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
    return KafkaConsumer(**opts)


def _admin(settings: Settings, timeout_s: float) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(request_timeout_ms=int(timeout_s * 1000), **kafka_options(settings))
    except KafkaError as exc:
        raise StreamLearnerError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc!r}") from None


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
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, partitions.get(role, 1), settings.replication_factor, topic_configs=configs.get(role))
            for role, name in settings.topics.items()
            if role in wanted_roles and name not in existing
        ]
        if wanted:
            try:
                admin.create_topics(wanted, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass  # another process won the race; the topic is there either way
        return [t.name for t in wanted]
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
        existing = set(admin.list_topics())
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
    error: EventError | Exception, *, topic: str, partition: int, offset: int, stage: str
) -> list[tuple[str, bytes]]:
    """The headers that say where a dead letter came from and why it was refused.

    >>> from stream_learner.errors import EventError
    >>> dict(dead_letter_headers(EventError("wrong_type", "$.features.x", "expected number"),
    ...                          topic="sl.predictions", partition=2, offset=41, stage="joiner"))[H_ERROR_FIELD]
    b'$.features.x'
    """
    kind = getattr(error, "kind", type(error).__name__)
    field = getattr(error, "field", "$")
    message = getattr(error, "reason", str(error))
    return [
        (H_SOURCE_TOPIC, topic.encode()),
        (H_SOURCE_PARTITION, str(partition).encode()),
        (H_SOURCE_OFFSET, str(offset).encode()),
        (H_ERROR_KIND, kind.encode()),
        (H_ERROR_FIELD, field.encode()),
        (H_ERROR_MESSAGE, message.encode()[:4096]),
        (H_STAGE, stage.encode()),
    ]


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
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError)


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
            error, topic=record.topic, partition=record.partition, offset=record.offset, stage=owner.stage
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

    def __init__(self, producer: KafkaProducer, topic: str, stage: str, metrics: Metrics | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.stage = stage
        self.metrics = metrics
        config = getattr(producer, "config", None)
        self.max_record_bytes = int(config["max_request_size"]) if isinstance(config, dict) else 1 << 62

    def send(self, record: Any, error: Exception) -> DeadLetter:
        """Dead-letter one consumed ``ConsumerRecord``; never raises (see :class:`DeadLetter`)."""
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
