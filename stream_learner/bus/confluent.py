"""The librdkafka backend of :mod:`stream_learner.bus` (``kafka_client = "confluent"``, the ``[confluent]`` extra).

Built on confluent-kafka. It keeps what the roles rely on from the
kafka-python backend:

* producers are ``acks=all`` with ``enable.idempotence``; ``send`` returns a
  future (``get(timeout)``, ``add_callback``, ``add_errback``) that serves
  the producer's delivery reports while it waits;
* consumers never auto-commit (``enable.auto.commit=false``), ``commit``
  takes next-to-read offsets, synchronously; ``position`` is the next
  offset the consumer returns (kept here: set by ``seek``, advanced by
  ``poll``, resolved from the committed offset or ``auto.offset.reset``);
* a paused partition returns nothing: records librdkafka had prefetched for
  it are held back, and ``resume`` seeks to the position, so none is lost;
* headers come as ``list[tuple[str, bytes]]``, ``isolation.level`` is
  ``read_uncommitted`` (kafka-python's default);
* the options are kafka-python's names (:func:`stream_learner.bus.make_consumer`),
  mapped here to librdkafka's (:data:`_NAMES`); SASL and TLS settings too.

Errors are :class:`~stream_learner.bus.TransportError` (and its kinds),
classified from librdkafka's ``KafkaError`` (``retriable()``, ``fatal()``
and the error code), the same transient/permanent split as kafka-python's.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import structlog
from confluent_kafka import OFFSET_INVALID, KafkaException
from confluent_kafka import Consumer as _Consumer
from confluent_kafka import KafkaError as _KafkaError
from confluent_kafka import Producer as _Producer
from confluent_kafka import TopicPartition as _TP
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ..config import Settings
from ..errors import ConfigError
from . import (
    KafkaTimeoutError,
    RebalancedError,
    ReceiveTooLargeError,
    Record,
    RecordTooLargeError,
    TopicPartition,
    TransportError,
    kafka_options,
)

log = structlog.get_logger(__name__)
_LIBRDKAFKA_LOG = logging.getLogger("librdkafka")

#: kafka-python option names -> librdkafka's (values as they are).
_NAMES = {
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "acks": "acks",
    "enable_idempotence": "enable.idempotence",
    "linger_ms": "linger.ms",
    "batch_size": "batch.size",
    "retries": "retries",
    "request_timeout_ms": "request.timeout.ms",
    "retry_backoff_ms": "retry.backoff.ms",
    "compression_type": "compression.type",
    "delivery_timeout_ms": "delivery.timeout.ms",
    "group_id": "group.id",
    "enable_auto_commit": "enable.auto.commit",
    "auto_offset_reset": "auto.offset.reset",
    "fetch_max_bytes": "fetch.max.bytes",
    "max_partition_fetch_bytes": "max.partition.fetch.bytes",
    "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms",
    "max_poll_interval_ms": "max.poll.interval.ms",
    "fetch_max_wait_ms": "fetch.wait.max.ms",
    "receive_message_max_bytes": "receive.message.max.bytes",
    "isolation_level": "isolation.level",
}
#: How long a producer keeps a topic's partitions before asking the broker again (seconds).
PARTITIONS_MAX_AGE_S = 30.0

#: kafka-python options handled here, not passed on.
_HANDLED = {"bootstrap_servers", "ssl_check_hostname", "max_request_size", "max_poll_records", "bootstrap_timeout_ms"}

_TOO_LARGE = {"MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_RECORD", "_MSG_SIZE_TOO_LARGE"}
_REBALANCED = {
    "ILLEGAL_GENERATION",
    "UNKNOWN_MEMBER_ID",
    "REBALANCE_IN_PROGRESS",
    "_ASSIGNMENT_LOST",
    "FENCED_INSTANCE_ID",
}
_AUTHENTICATION = {"SASL_AUTHENTICATION_FAILED", "_AUTHENTICATION", "UNSUPPORTED_SASL_MECHANISM", "ILLEGAL_SASL_STATE"}
_AUTHORIZATION = {
    "TOPIC_AUTHORIZATION_FAILED",
    "GROUP_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
}
_TIMEOUT = {"_TIMED_OUT", "_MSG_TIMED_OUT", "REQUEST_TIMED_OUT", "_TIMED_OUT_QUEUE"}
#: Codes a wait cures that librdkafka does not mark retriable (the broker or a leader away).
_TRANSIENT = {
    "_TRANSPORT",
    "_ALL_BROKERS_DOWN",
    "_RESOLVE",
    "_WAIT_COORD",
    "_UNKNOWN_PARTITION",
    "_UNKNOWN_TOPIC",
    "UNKNOWN_TOPIC_OR_PART",
    "LEADER_NOT_AVAILABLE",
    "NOT_LEADER_FOR_PARTITION",
    "BROKER_NOT_AVAILABLE",
    "REPLICA_NOT_AVAILABLE",
    "NOT_ENOUGH_REPLICAS",
    "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
    "NOT_COORDINATOR",
    "COORDINATOR_NOT_AVAILABLE",
    "COORDINATOR_LOAD_IN_PROGRESS",
    "NETWORK_EXCEPTION",
    "KAFKA_STORAGE_ERROR",
    "_QUEUE_FULL",
}


def error(err: _KafkaError | BaseException | None, what: str = "") -> TransportError:
    """The :class:`~stream_learner.bus.TransportError` for a librdkafka error (or a ``KafkaException``)."""
    if isinstance(err, KafkaException) and err.args and isinstance(err.args[0], _KafkaError):
        err = err.args[0]
    if not isinstance(err, _KafkaError):
        return TransportError(f"{what}: {err}", kind="permanent")
    code = err.name()
    text = f"{what + ': ' if what else ''}{code}: {err.str()}"
    if code in _TOO_LARGE:
        return RecordTooLargeError(text, code=code)
    if code in _REBALANCED:
        return RebalancedError(text, code=code)
    if "receive.message.max.bytes" in err.str():
        return ReceiveTooLargeError(text, kind="transient", code=code)
    if code in _AUTHENTICATION:
        return TransportError(text, kind="authentication", code=code)
    if code in _AUTHORIZATION:
        return TransportError(text, kind="authorization", code=code)
    if code in _TIMEOUT:
        return KafkaTimeoutError(text, kind="transient", code=code)
    if err.fatal() or code == "_SSL":
        return TransportError(text, kind="permanent", code=code)
    if err.retriable() or code in _TRANSIENT:
        return TransportError(text, kind="transient", code=code)
    return TransportError(text, kind="permanent", code=code)


def options(settings: Settings, opts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """librdkafka's configuration for kafka-python-named ``opts`` (the connection and security ones by default).

    >>> conf = options(Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
    ...                         sasl_username="u", sasl_password="p", ssl_check_hostname=False))
    >>> conf["sasl.mechanism"], conf["sasl.username"], conf["ssl.endpoint.identification.algorithm"]
    ('SCRAM-SHA-512', 'u', 'none')
    """
    opts = dict(kafka_options(settings) if opts is None else opts)
    servers = opts.get("bootstrap_servers", settings.bootstrap_servers)
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(servers) if isinstance(servers, list | tuple) else str(servers),
        "log_level": 3,  # errors only: librdkafka's own retries are not news
        # Through the process's logging (structlog's format), not librdkafka's own lines on stderr.
        "logger": _LIBRDKAFKA_LOG,
    }
    if "ssl_check_hostname" in opts:
        conf["ssl.endpoint.identification.algorithm"] = "https" if opts["ssl_check_hostname"] else "none"
    for key, value in opts.items():
        if key in _HANDLED or value is None:
            continue
        name = _NAMES.get(key)
        if name is None:
            raise ConfigError(f"the confluent Kafka client has no equivalent of the kafka-python option {key!r}")
        conf[name] = value
    return conf


class Delivered(NamedTuple):
    """The broker's acknowledgement of one record."""

    topic: str
    partition: int
    offset: int
    timestamp: int


class Future:
    """A record on its way: ``get`` serves the producer's delivery reports until this one's came."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._done = threading.Event()
        self._value: Delivered | None = None
        self._error: TransportError | None = None
        self._callbacks: list[Callable[[Any], None]] = []
        self._errbacks: list[Callable[[BaseException], None]] = []
        self._lock = threading.Lock()

    def _report(self, err: _KafkaError | None, msg: Any) -> None:
        with self._lock:
            if err is not None:
                self._error = error(err, f"delivery to {msg.topic()}")
            else:
                self._value = Delivered(msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1])
            self._done.set()
            callbacks, errbacks = list(self._callbacks), list(self._errbacks)
        self._fire(callbacks, errbacks)

    def _fire(self, callbacks: list[Callable[[Any], None]], errbacks: list[Callable[[BaseException], None]]) -> None:
        for fn in callbacks if self._error is None else []:
            fn(self._value)
        for eb in errbacks if self._error is not None else []:
            eb(self._error)  # type: ignore[arg-type]

    def add_callback(self, fn: Callable[[Any], None]) -> Future:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return self
        if self._error is None:
            fn(self._value)
        return self

    def add_errback(self, fn: Callable[[BaseException], None]) -> Future:
        with self._lock:
            if not self._done.is_set():
                self._errbacks.append(fn)
                return self
        if self._error is not None:
            fn(self._error)
        return self

    def is_done(self) -> bool:
        return self._done.is_set()

    def get(self, timeout: float | None = None) -> Delivered:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            left = 0.1 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise KafkaTimeoutError(f"no acknowledgement within {timeout} s", kind="transient", code="_TIMED_OUT")
            self._producer.inner.poll(min(left, 0.1))
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class Producer:
    """:class:`stream_learner.bus.Producer` over librdkafka: idempotent, ``acks=all``."""

    client = "confluent"

    def __init__(self, settings: Settings, opts: dict[str, Any]) -> None:
        self.max_request_size = int(opts["max_request_size"])
        conf = options(settings, opts)
        conf["message.max.bytes"] = self.max_request_size
        conf["batch.size"] = min(int(conf.get("batch.size", 1_000_000)), self.max_request_size)
        conf["acks"], conf["enable.idempotence"] = "all", True
        try:
            self.inner = _Producer(conf)
        except KafkaException as exc:
            raise error(exc, "creating a producer") from None
        # librdkafka runs delivery reports in the thread that polls: poll in the background, so a
        # future's callbacks fire without the caller polling (as kafka-python's I/O thread does).
        self._partitions: dict[str, tuple[float, set[int]]] = {}  # topic -> (when asked, partitions)
        self._closed = threading.Event()
        self._reports = threading.Thread(target=self._serve, name="confluent-delivery-reports", daemon=True)
        self._reports.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            self.inner.poll(0.1)

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Future:
        future = Future(self)
        extra: dict[str, Any] = {}
        if partition is not None:
            extra["partition"] = partition
        if timestamp_ms is not None:
            extra["timestamp"] = timestamp_ms
        wire: Any = headers or None
        deadline = time.monotonic() + 60.0
        while True:
            try:
                self.inner.produce(topic, value=value, key=key, headers=wire, on_delivery=future._report, **extra)
                break
            except BufferError:  # the local queue is full: serve delivery reports, then try again
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError("the producer's queue stayed full for 60 s", kind="transient") from None
                self.inner.poll(0.05)
            except KafkaException as exc:
                raise error(exc, f"producing to {topic}") from None
        self.inner.poll(0)
        return future

    def partitions_for(self, topic: str) -> set[int]:
        # Kept for PARTITIONS_MAX_AGE_S, as kafka-python answers from its metadata cache: asked of
        # the broker every time, this one request cost the joiner (once per cycle) half its speed.
        now = time.monotonic()
        cached = self._partitions.get(topic)
        if cached is not None and now - cached[0] < PARTITIONS_MAX_AGE_S:
            return set(cached[1])
        try:
            meta = self.inner.list_topics(topic, timeout=30.0).topics.get(topic)
        except KafkaException as exc:
            raise error(exc, f"metadata of {topic}") from None
        if meta is None or meta.error is not None:
            raise error(None if meta is None else meta.error, f"metadata of {topic}")
        self._partitions[topic] = (now, set(meta.partitions))
        return set(meta.partitions)

    def flush(self, timeout: float | None = None) -> None:
        left = self.inner.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records not acknowledged within {timeout} s", kind="transient")

    def close(self, timeout: float | None = None) -> None:
        if self._closed.is_set():
            return  # closed already: librdkafka's handle is gone
        try:
            self.inner.flush(-1 if timeout is None else timeout)
        finally:
            self._closed.set()
            self._reports.join(timeout=1.0)
            # What the broker did not take in time fails now (as kafka-python's close): its futures
            # get the purge error, and the handle stops, not reconnecting in the background forever.
            self.inner.purge()
            self.inner.poll(0)
            self.inner.close()


def _tp(tp: Any) -> TopicPartition:
    return TopicPartition(tp[0], tp[1]) if isinstance(tp, tuple) else TopicPartition(tp.topic, tp.partition)


class Consumer:
    """:class:`stream_learner.bus.Consumer` over librdkafka (see the module docstring)."""

    client = "confluent"

    def __init__(self, settings: Settings, opts: dict[str, Any]) -> None:
        self.max_poll_records = int(opts.get("max_poll_records", 500))
        self.group = opts.get("group_id")
        conf = options(settings, opts)
        if self.group is None:  # librdkafka wants one; a consumer that only assigns never joins or commits
            conf["group.id"] = f"stream-learner-nogroup-{uuid.uuid4().hex}"
        fetch = int(conf.get("fetch.max.bytes", 52_428_800))
        conf["message.max.bytes"] = max(1000, min(fetch, 1_000_000))
        conf["fetch.max.bytes"] = max(fetch, conf["message.max.bytes"])
        conf["max.partition.fetch.bytes"] = max(1, int(conf.get("max.partition.fetch.bytes", 1_048_576)))
        conf["receive.message.max.bytes"] = max(
            int(conf.get("receive.message.max.bytes", 0)), conf["fetch.max.bytes"] + 512, 100_000_000
        )
        conf["enable.auto.commit"] = False
        conf["enable.auto.offset.store"] = False
        conf.setdefault("isolation.level", "read_uncommitted")
        conf.setdefault("enable.partition.eof", False)
        conf["max.poll.interval.ms"] = max(
            int(conf.get("max.poll.interval.ms", 300_000)), int(conf.get("session.timeout.ms", 45_000))
        )
        self.reset = str(conf.get("auto.offset.reset", "latest"))
        try:
            self.inner = _Consumer(conf)
        except KafkaException as exc:
            raise error(exc, "creating a consumer") from None
        if "bootstrap_timeout_ms" in opts:
            # As kafka-python's constructor: no broker within the time is an error now (transient),
            # where librdkafka alone would go on retrying inside and every poll would be empty.
            timeout_s = max(int(opts["bootstrap_timeout_ms"]), 1) / 1000
            try:
                self.inner.list_topics(timeout=timeout_s)
            except KafkaException as exc:
                self.inner.close()
                raise TransportError(
                    f"no broker of {conf['bootstrap.servers']} answered within {timeout_s:g} s: {exc}",
                    kind="transient",
                ) from None
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._pos: dict[TopicPartition, int] = {}
        self._lock = threading.RLock()
        self._closed = False

    # -- assignment ------------------------------------------------------------------------

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[list[Any]], None] | None = None,
        on_revoke: Callable[[list[Any]], None] | None = None,
    ) -> None:
        def assigned(_c: Any, parts: list[_TP]) -> None:
            tps = [_tp(p) for p in parts]
            with self._lock:
                self._assigned = set(tps)
                for tp in tps:
                    self._pos.pop(tp, None)  # from the committed offset (or the reset policy)
            if on_assign is not None:
                on_assign(tps)

        def revoked(_c: Any, parts: list[_TP]) -> None:
            tps = [_tp(p) for p in parts]
            if on_revoke is not None:
                on_revoke(tps)
            with self._lock:
                self._assigned -= set(tps)
                self._paused -= set(tps)
                for tp in tps:
                    self._pos.pop(tp, None)

        self.inner.subscribe(list(topics), on_assign=assigned, on_revoke=revoked, on_lost=revoked)

    def assign(self, partitions: Iterable[Any]) -> None:
        tps = [_tp(p) for p in partitions]
        with self._lock:
            if set(tps) == self._assigned:
                return  # as it is: a new assign would restart librdkafka's fetchers (~100s of ms)
            self._assigned = set(tps)
            self._paused &= self._assigned
            self._pos = {tp: off for tp, off in self._pos.items() if tp in self._assigned}
            self._reassign()

    def _reassign(self) -> None:
        """Hand librdkafka the assignment with the known positions (a seek before the first fetch)."""
        self.inner.assign([_TP(tp.topic, tp.partition, self._pos.get(tp, OFFSET_INVALID)) for tp in self._assigned])
        if self._paused:
            self.inner.pause([_TP(tp.topic, tp.partition) for tp in self._paused])

    def assignment(self) -> set[Any]:
        return set(self._assigned)

    # -- reading -----------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        limit = max(1, min(max_records or self.max_poll_records, self.max_poll_records))
        try:
            # As kafka-python's poll: return as soon as records are there (librdkafka's consume
            # alone waits until the batch is full or the timeout is over).
            messages = self.inner.consume(num_messages=limit, timeout=0)
            if not messages and timeout_ms > 0:
                messages = self.inner.consume(num_messages=1, timeout=timeout_ms / 1000)
                if messages and limit > 1:
                    messages += self.inner.consume(num_messages=limit - 1, timeout=0)
        except KafkaException as exc:
            raise error(exc, "poll") from None
        out: dict[Any, list[Any]] = {}
        with self._lock:
            for message in messages:
                msg: Any = message
                err = msg.error()
                if err is not None:
                    mapped = error(err, "poll")
                    if err.fatal() or (mapped.kind != "transient" and msg.topic() is not None):
                        raise mapped
                    log.debug("kafka_poll_error", error=str(mapped))  # librdkafka retries it
                    continue
                tp = TopicPartition(msg.topic(), msg.partition())
                if tp not in self._assigned or tp in self._paused:
                    continue  # prefetched before a pause: read again from the position on resume
                offset = msg.offset()
                expected = self._pos.get(tp)
                if expected is not None and offset < expected:
                    continue  # from before a seek forward
                headers = msg.headers() or []
                out.setdefault(tp, []).append(
                    Record(
                        tp.topic,
                        tp.partition,
                        offset,
                        msg.key(),
                        msg.value(),
                        [(k, v if v is not None else b"") for k, v in headers],
                        msg.timestamp()[1],
                    )
                )
                self._pos[tp] = offset + 1
        return out

    def seek(self, partition: Any, offset: int) -> None:
        tp = _tp(partition)
        with self._lock:
            if tp not in self._assigned:
                raise TransportError(f"seek on {tp.topic}[{tp.partition}], which is not assigned", kind="permanent")
            self._pos[tp] = int(offset)
            try:
                self.inner.seek(_TP(tp.topic, tp.partition, int(offset)))
            except KafkaException:
                self._reassign()  # not fetching yet (just assigned): start there instead

    def _bounds(self, tp: TopicPartition, cached: bool = False, timeout: float = 30.0) -> tuple[int, int]:
        try:
            return self.inner.get_watermark_offsets(_TP(tp.topic, tp.partition), timeout=timeout, cached=cached)
        except KafkaException as exc:
            raise error(exc, f"offsets of {tp.topic}[{tp.partition}]") from None

    def seek_to_beginning(self, *partitions: Any) -> None:
        for p in partitions or tuple(self._assigned):
            self.seek(p, self._bounds(_tp(p))[0])

    def seek_to_end(self, *partitions: Any) -> None:
        for p in partitions or tuple(self._assigned):
            self.seek(p, self._bounds(_tp(p))[1])

    def position(self, partition: Any, timeout_ms: int | None = None) -> int:
        tp = _tp(partition)
        with self._lock:
            if tp in self._pos:
                return self._pos[tp]
        timeout = 30.0 if timeout_ms is None else max(timeout_ms, 1) / 1000
        committed = self.committed(tp, timeout=timeout) if self.group is not None else None
        if committed is None:
            lo, hi = self._bounds(tp, timeout=timeout)
            committed = lo if self.reset == "earliest" else hi
        with self._lock:
            return self._pos.setdefault(tp, committed)

    def highwater(self, partition: Any) -> int | None:
        try:
            hi = self._bounds(_tp(partition), cached=True)[1]
        except TransportError:
            return None
        return hi if hi >= 0 else None

    def commit(self, offsets: Mapping[Any, int]) -> None:
        if not offsets:
            return
        parts = [_TP(_tp(tp).topic, _tp(tp).partition, int(off)) for tp, off in offsets.items()]
        try:
            answer = self.inner.commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            raise error(exc, "commit") from None
        for part in answer or []:
            if part.error is not None:
                raise error(part.error, f"commit of {part.topic}[{part.partition}]")

    def committed(self, partition: Any, timeout: float = 30.0) -> int | None:
        tp = _tp(partition)
        try:
            (part,) = self.inner.committed([_TP(tp.topic, tp.partition)], timeout=timeout)
        except KafkaException as exc:
            raise error(exc, f"committed offset of {tp.topic}[{tp.partition}]") from None
        return int(part.offset) if part.offset >= 0 else None

    def end_offsets(self, partitions: Iterable[Any]) -> dict[Any, int]:
        return {_tp(p): self._bounds(_tp(p))[1] for p in partitions}

    def beginning_offsets(self, partitions: Iterable[Any]) -> dict[Any, int]:
        return {_tp(p): self._bounds(_tp(p))[0] for p in partitions}

    def offsets_for_times(self, timestamps: Mapping[Any, int], timeout_ms: int = 30_000) -> dict[Any, int | None]:
        parts = [_TP(_tp(tp).topic, _tp(tp).partition, int(t)) for tp, t in timestamps.items()]
        try:
            answer = self.inner.offsets_for_times(parts, timeout=timeout_ms / 1000)
        except KafkaException as exc:
            raise error(exc, "offsets_for_times") from None
        out: dict[Any, int | None] = {}
        for part in answer:
            if part.error is not None:
                raise error(part.error, "offsets_for_times")
            out[TopicPartition(part.topic, part.partition)] = int(part.offset) if part.offset >= 0 else None
        return out

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        try:
            meta = self.inner.list_topics(topic, timeout=30.0).topics.get(topic)
        except KafkaException as exc:
            raise error(exc, f"metadata of {topic}") from None
        if meta is None or meta.error is not None or not meta.partitions:
            return None
        return set(meta.partitions)

    def pause(self, *partitions: Any) -> None:
        tps = [_tp(p) for p in partitions]
        with self._lock:
            self._paused |= set(tps)
            if tps:
                self.inner.pause([_TP(tp.topic, tp.partition) for tp in tps])

    def resume(self, *partitions: Any) -> None:
        tps = [_tp(p) for p in partitions]
        with self._lock:
            self._paused -= set(tps)
            if tps:
                self.inner.resume([_TP(tp.topic, tp.partition) for tp in tps])
            for tp in tps:  # what was prefetched while paused was dropped: read it again
                if tp in self._pos and tp in self._assigned:
                    self.seek(tp, self._pos[tp])

    def paused(self) -> set[Any]:
        return set(self._paused)

    def connected(self) -> bool:
        try:
            self.inner.list_topics(timeout=1.0)
        except KafkaException:
            return False
        return True

    def close(self) -> None:
        if not self._closed:  # a second close is a no-op, as kafka-python's
            self._closed = True
            self.inner.close()


class Admin:
    """List and create topics with librdkafka's admin client."""

    def __init__(self, settings: Settings, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.inner = AdminClient(options(settings))
        self.list_topics()  # as kafka-python's constructor does: fail here when the brokers cannot be reached

    def list_topics(self) -> set[str]:
        try:
            meta = self.inner.list_topics(timeout=self.timeout_s)
        except KafkaException as exc:
            raise error(exc, "listing topics") from None
        return {name for name in meta.topics if not name.startswith("__")}

    def create_topics(self, topics: list[tuple[str, int, int, dict[str, str] | None]], timeout_s: float) -> None:
        """Create ``(name, partitions, replication, configs)``; one that exists already is no error."""
        wanted = [NewTopic(name, n, rf, config=dict(configs or {})) for name, n, rf, configs in topics]
        futures = self.inner.create_topics(wanted, request_timeout=timeout_s, operation_timeout=timeout_s)
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, _KafkaError) and err.code() == _KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # another process won the race; the topic is there either way
                raise error(exc, f"creating {name}") from None

    def close(self) -> None:
        pass  # librdkafka's admin client closes when it is collected
