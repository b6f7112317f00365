"""Dead letters are always sendable: whole when they fit, truncated when not, skipped (counted) when refused."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, TopicAuthorizationFailedError

from stream_learner.bus import (
    DEAD_LETTER_PREFIX_BYTES,
    H_ERROR_KIND,
    H_ORIGINAL_SHA256,
    H_ORIGINAL_SIZE,
    H_TRUNCATED,
    DeadLetters,
)
from stream_learner.errors import EventError
from stream_learner.metrics import Metrics


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Future:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return "acked"


class Broker:
    """A producer faked in memory: ``max_request_size`` as kafka-python checks it (raising in
    ``send``), a broker limit (the future fails), and errors to fail the next sends with."""

    def __init__(self, max_request_size: int = 1 << 20, broker_limit: int = 1 << 30) -> None:
        self.config = {"max_request_size": max_request_size}
        self.broker_limit = broker_limit
        self.fail_next: list[Exception] = []
        self.sent: list[dict[str, Any]] = []

    def send(self, topic: str, *, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> Future:
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers) + 100
        if size > self.config["max_request_size"]:
            raise MessageSizeTooLargeError(f"the message is {size} bytes")
        if self.fail_next:
            return Future(self.fail_next.pop(0))
        if size > self.broker_limit:
            return Future(MessageSizeTooLargeError("MESSAGE_TOO_LARGE"))
        self.sent.append({"key": key, "value": value, "headers": dict(headers)})
        return Future(None)


def letters(broker: Broker) -> tuple[DeadLetters, Metrics]:
    metrics = Metrics()
    return DeadLetters(broker, "dlq", stage="joiner", metrics=metrics), metrics  # type: ignore[arg-type]


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"stage": "joiner"}) or 0.0


ERROR = EventError("oversized", "$", "too big")


def test_a_record_that_fits_goes_byte_for_byte() -> None:
    broker = Broker()
    dlq, metrics = letters(broker)
    assert dlq.send(Record("in", 1, 7, b"k", b"v" * 1000), ERROR).get() == "acked"
    assert broker.sent[0]["value"] == b"v" * 1000 and H_TRUNCATED not in broker.sent[0]["headers"]
    assert sample(metrics, "stream_learner_dead_letters_truncated_total") == 0


@pytest.mark.parametrize("size", [2 << 20, 3_000_000])
def test_a_record_the_producer_would_refuse_goes_truncated_with_its_size_and_digest(size: int) -> None:
    broker = Broker(max_request_size=(1 << 20) + 64 * 1024)
    dlq, metrics = letters(broker)
    value = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert dlq.send(Record("in", 0, 3, b"k", value), ERROR).get() == "acked"
    (sent,) = broker.sent
    assert sent["value"] == value[:DEAD_LETTER_PREFIX_BYTES]
    assert sent["headers"][H_TRUNCATED] == b"true"
    assert sent["headers"][H_ORIGINAL_SIZE] == str(size).encode()
    assert sent["headers"][H_ORIGINAL_SHA256] == hashlib.sha256(value).hexdigest().encode()
    assert sent["headers"][H_ERROR_KIND] == b"oversized"
    assert sample(metrics, "stream_learner_dead_letters_truncated_total") == 1


def test_a_record_the_broker_refuses_whole_goes_truncated() -> None:
    # Apache Kafka's default message.max.bytes (1,048,588) takes an event just under 1 MiB, not with the headers.
    broker = Broker(max_request_size=2 << 20, broker_limit=1_048_588)
    dlq, _ = letters(broker)
    value = b"y" * 1_048_400
    assert dlq.send(Record("in", 0, 3, b"k", value), ERROR).get() == "acked"
    assert broker.sent[0]["headers"][H_ORIGINAL_SIZE] == str(len(value)).encode()
    assert len(broker.sent[0]["value"]) == DEAD_LETTER_PREFIX_BYTES


def test_a_record_the_broker_refuses_even_truncated_is_counted_and_skipped() -> None:
    broker = Broker(broker_limit=1000)
    dlq, metrics = letters(broker)
    letter = dlq.send(Record("in", 2, 9, b"k", b"z" * 5000), ERROR)
    assert letter.get() is None and letter.get() is None  # never raises, and the answer is final
    assert not broker.sent
    assert sample(metrics, "stream_learner_dead_letters_unsendable_total") == 1


def test_a_permanent_refusal_is_counted_and_skipped() -> None:
    broker = Broker()
    broker.fail_next = [TopicAuthorizationFailedError()]
    dlq, metrics = letters(broker)
    assert dlq.send(Record("in", 2, 9, b"k", b"z"), ERROR).get() is None
    assert sample(metrics, "stream_learner_dead_letters_unsendable_total") == 1


def test_a_transient_failure_raises_and_the_next_get_sends_again() -> None:
    broker = Broker()
    broker.fail_next = [KafkaTimeoutError("no broker")]
    dlq, metrics = letters(broker)
    letter = dlq.send(Record("in", 2, 9, b"k", b"z"), ERROR)
    with pytest.raises(KafkaTimeoutError):
        letter.get()
    assert letter.get() == "acked" and len(broker.sent) == 1
    assert sample(metrics, "stream_learner_dead_letters_unsendable_total") == 0
