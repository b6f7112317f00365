"""The kafka-python backend of :mod:`stream_learner.bus` (the default, ``kafka_client = "kafka-python"``).

Thin: the interface of :mod:`stream_learner.bus` is kafka-python's own API
(the subset the roles use), so these wrappers mostly delegate. What they
add: ``commit`` of plain next-to-read offsets, ``connected``, and a
``max_request_size`` on the producer. Records are kafka-python's
``ConsumerRecord`` as they come (they carry every field of
:class:`~stream_learner.bus.Record`); errors are ``kafka.errors`` as they
come (:func:`stream_learner.bus.kafka_error_kind` classifies them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as _TP
from kafka import errors as kafka_errors
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2 as murmur2
from kafka.structs import OffsetAndMetadata

from ..config import Settings

errors = kafka_errors  # for doctests elsewhere: kafka-python's error types

#: kafka-python errors by what :mod:`stream_learner.bus` names them.
KAFKA_ERROR: type[Exception] = kafka_errors.KafkaError
REBALANCED: tuple[type[Exception], ...] = (
    kafka_errors.CommitFailedError,
    kafka_errors.IllegalGenerationError,
    kafka_errors.RebalanceInProgressError,
    kafka_errors.UnknownMemberIdError,
)
RECEIVE_TOO_LARGE: tuple[type[Exception], ...] = (kafka_errors.InvalidReceiveError,)
RECORD_TOO_LARGE: tuple[type[Exception], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidRecordError,
)
TIMEOUT: tuple[type[Exception], ...] = (kafka_errors.KafkaTimeoutError,)
#: Kafka errors kafka-python does not mark retriable, but a wait cures.
_TRANSIENT: tuple[type[Exception], ...] = (kafka_errors.BrokerNotAvailableError,)


def error_kind(exc: BaseException) -> str | None:
    """``transient``, ``authentication``, ``authorization`` or ``permanent`` for a kafka-python error, else None."""
    if not isinstance(exc, kafka_errors.KafkaError):
        return None
    if isinstance(exc, (kafka_errors.SaslAuthenticationFailedError, kafka_errors.UnsupportedSaslMechanismError)):
        return "authentication"
    if isinstance(exc, kafka_errors.AuthorizationError):
        return "authorization"
    if getattr(exc, "retriable", False) or isinstance(exc, _TRANSIENT):
        return "transient"
    return "permanent"


def options(settings: Settings) -> dict[str, Any]:
    """Connection and security options shared by every kafka-python client."""
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


def _k(tp: Any) -> Any:
    """kafka-python's own ``TopicPartition`` (it checks the type) for any ``(topic, partition)``."""
    return tp if isinstance(tp, _TP) else _TP(tp[0], tp[1])


class Consumer:
    """:class:`stream_learner.bus.Consumer` over a ``KafkaConsumer``."""

    client = "kafka-python"

    def __init__(self, opts: dict[str, Any]) -> None:
        self.inner = KafkaConsumer(**opts)

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[list[Any]], None] | None = None,
        on_revoke: Callable[[list[Any]], None] | None = None,
    ) -> None:
        listener = None
        if on_assign is not None or on_revoke is not None:
            from kafka import ConsumerRebalanceListener

            class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
                def on_partitions_revoked(self, revoked: Any) -> None:
                    if on_revoke is not None:
                        on_revoke(list(revoked))

                def on_partitions_assigned(self, assigned: Any) -> None:
                    if on_assign is not None:
                        on_assign(list(assigned))

            listener = _Listener()
        self.inner.subscribe(topics, listener=listener)

    def assign(self, partitions: Iterable[Any]) -> None:
        self.inner.assign([_k(tp) for tp in partitions])

    def assignment(self) -> set[Any]:
        return set(self.inner.assignment())

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        return self.inner.poll(timeout_ms=timeout_ms, max_records=max_records)  # type: ignore[no-any-return]

    def seek(self, partition: Any, offset: int) -> None:
        self.inner.seek(_k(partition), offset)

    def seek_to_beginning(self, *partitions: Any) -> None:
        self.inner.seek_to_beginning(*map(_k, partitions))

    def seek_to_end(self, *partitions: Any) -> None:
        self.inner.seek_to_end(*map(_k, partitions))

    def position(self, partition: Any, timeout_ms: int | None = None) -> int:
        return self.inner.position(_k(partition), timeout_ms=timeout_ms)  # type: ignore[no-any-return]

    def highwater(self, partition: Any) -> int | None:
        return self.inner.highwater(_k(partition))  # type: ignore[no-any-return]

    def commit(self, offsets: Mapping[Any, int]) -> None:
        self.inner.commit({_k(tp): OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})

    def committed(self, partition: Any) -> int | None:
        return self.inner.committed(_k(partition))  # type: ignore[no-any-return]

    def end_offsets(self, partitions: Iterable[Any]) -> dict[Any, int]:
        return dict(self.inner.end_offsets([_k(tp) for tp in partitions]))

    def beginning_offsets(self, partitions: Iterable[Any]) -> dict[Any, int]:
        return dict(self.inner.beginning_offsets([_k(tp) for tp in partitions]))

    def offsets_for_times(self, timestamps: Mapping[Any, int], timeout_ms: int = 30_000) -> dict[Any, int | None]:
        answer = self.inner.offsets_for_times({_k(tp): t for tp, t in timestamps.items()}, timeout_ms=timeout_ms)
        return {tp: (None if found is None else int(found.offset)) for tp, found in answer.items()}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        found = self.inner.partitions_for_topic(topic)
        return None if found is None else set(found)

    def pause(self, *partitions: Any) -> None:
        self.inner.pause(*map(_k, partitions))

    def resume(self, *partitions: Any) -> None:
        self.inner.resume(*map(_k, partitions))

    def paused(self) -> set[Any]:
        return set(self.inner.paused())

    def connected(self) -> bool:
        count = self.inner.metrics().get("consumer-metrics", {}).get("connection-count")
        return bool(count)

    def close(self) -> None:
        self.inner.close(autocommit=False)


class Producer:
    """:class:`stream_learner.bus.Producer` over a ``KafkaProducer``; ``send`` returns its future."""

    client = "kafka-python"

    def __init__(self, opts: dict[str, Any]) -> None:
        self.inner = KafkaProducer(**opts)
        self.max_request_size = int(opts["max_request_size"])

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Any:
        return self.inner.send(
            topic, value=value, key=key, headers=headers, partition=partition, timestamp_ms=timestamp_ms
        )

    def partitions_for(self, topic: str) -> set[int]:
        return set(self.inner.partitions_for(topic))

    def flush(self, timeout: float | None = None) -> None:
        self.inner.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self.inner.close(timeout=timeout)


class Admin:
    """List and create topics."""

    def __init__(self, opts: dict[str, Any], timeout_s: float) -> None:
        self.inner = KafkaAdminClient(request_timeout_ms=int(timeout_s * 1000), **opts)

    def list_topics(self) -> set[str]:
        return set(self.inner.list_topics())

    def create_topics(self, topics: list[tuple[str, int, int, dict[str, str] | None]], timeout_s: float) -> None:
        """Create ``(name, partitions, replication, configs)``; one that exists already is no error."""
        wanted = [NewTopic(name, n, rf, topic_configs=configs) for name, n, rf, configs in topics]
        try:
            self.inner.create_topics(wanted, timeout_ms=int(timeout_s * 1000))
        except kafka_errors.TopicAlreadyExistsError:
            pass  # another process won the race; the topic is there either way

    def close(self) -> None:
        self.inner.close()
