"""Kafka clients built from :class:`~stream_learner.config.Settings`, topic setup, dead letters.

Every role gets its producers and consumers here, so security settings
(SSL, SASL PLAIN/SCRAM) apply everywhere without code changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from .config import Settings
from .errors import EventError, MissingTopicError, StreamLearnerError
from .metrics import Metrics

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


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """An idempotent, acks=all producer: retries never duplicate or reorder a partition."""
    opts = {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": max(settings.max_event_bytes * 2, 1 << 20),
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
    """
    partitions = {
        "predictions": settings.partitions_input,
        "labels": settings.partitions_input,
        "examples": settings.partitions_examples,
    }
    wanted_roles = set(settings.topics if roles is None else roles)
    admin = _admin(settings, timeout_s)
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, partitions.get(role, 1), settings.replication_factor)
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
            "create missing topics)")
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


class DeadLetters:
    """Sends refused records, byte for byte, to the dead-letter topic.

    The original key and value are kept so nothing is lost; the reason is in
    the headers. The returned future resolves when the broker has the record,
    so a caller commits its input offset only after that. Each dead letter is
    counted in ``stream_learner_dead_letters_total{stage,kind}`` when
    ``metrics`` is given.
    """

    def __init__(self, producer: KafkaProducer, topic: str, stage: str, metrics: Metrics | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.stage = stage
        self.metrics = metrics

    def send(self, record: Any, error: Exception) -> Any:
        """Dead-letter one consumed ``ConsumerRecord``; return the send future."""
        log.warning(
            "dead_letter",
            stage=self.stage,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=str(error),
        )
        if self.metrics is not None:
            kind = getattr(error, "kind", type(error).__name__)
            self.metrics.dead_letters.labels(stage=self.stage, kind=kind).inc()
        # Oversized values stay oversized for the DLQ too; truncating would
        # lose data, so the producer's max_request_size leaves room for them.
        return self.producer.send(
            self.topic,
            key=record.key,
            value=record.value,
            headers=dead_letter_headers(
                error, topic=record.topic, partition=record.partition, offset=record.offset, stage=self.stage
            ),
        )
