"""The client SDK that applications embed to log predictions and labels.

Logging never blocks the request path. Each call validates and encodes the
event on the caller's thread (so a bad event raises there, with the field
named) and appends the bytes to a bounded in-memory buffer; a background
thread hands them to an idempotent kafka-python producer.

Buffer policy: the buffer holds at most ``buffer_bytes`` of events that are
not yet acknowledged by the broker (queued or in flight). When a new event
does not fit, ``on_full="drop"`` (the default) drops it at once and counts
it in ``stats.dropped``; ``on_full="block"`` waits up to ``block_timeout_s``
for room, then drops. Events that the broker refuses after the producer's
retries are counted in ``stats.failed``; acknowledged ones in ``stats.sent``.

Events are keyed by request id. Nothing downstream relies on which partition
a key lands in, so any producer (kcat, librdkafka, Java) may write the same
events.

Example, against a running broker::

    with PredictionLogger(bootstrap_servers="localhost:9092", model="churn", model_version="7") as sl:
        sl.log_prediction("req-1", {"age": 41, "visits": 3}, {"yes": 0.8, "no": 0.2})
        sl.log_label("req-1", "yes")
    print(sl.stats)
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from .bus import Producer, make_producer
from .config import Settings
from .events import LABEL, PREDICTION, FeatureValue, encode, now_ms
from .metrics import Metrics
from .util.backoff import Backoff

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SDKStats:
    """Counters of one logger. ``buffered`` is unacknowledged events right now."""

    sent: int
    failed: int
    dropped: int
    buffered: int


class PredictionLogger:
    """Buffered, non-blocking logger of prediction and label events.

    Pass either ``settings`` or ``bootstrap_servers`` (plus any kafka-python
    producer options in ``producer_options``, e.g. SASL settings).
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        settings: Settings | None = None,
        model: str | None = None,
        model_version: str | None = None,
        buffer_bytes: int = 32 * 1024 * 1024,
        on_full: Literal["drop", "block"] = "drop",
        block_timeout_s: float = 1.0,
        producer_options: Mapping[str, Any] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if settings is None:
            settings = Settings(bootstrap_servers=bootstrap_servers or "127.0.0.1:9092")
        elif bootstrap_servers is not None:
            raise ValueError("pass bootstrap_servers or settings, not both")
        if on_full not in ("drop", "block"):
            raise ValueError(f"on_full must be 'drop' or 'block', not {on_full!r}")
        if buffer_bytes < 1:
            raise ValueError("buffer_bytes must be positive")
        self.settings = settings
        self.model = model
        self.model_version = model_version
        self.buffer_bytes = buffer_bytes
        self.on_full = on_full
        self.block_timeout_s = block_timeout_s
        self.metrics = metrics
        # Event ids: a random per-logger prefix and a counter is unique and
        # ~20x cheaper than a uuid4 per event.
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count()
        self._queue: deque[tuple[str, bytes, bytes, str]] = deque()
        self._buffered_bytes = 0
        self._buffered_events = 0
        self._sent = self._failed = self._dropped = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._closing = False
        self._producer_options = dict(producer_options or {})
        # Created by the background thread: kafka-python bootstraps in its
        # constructor, and an application must start even when Kafka is down.
        self._producer: Producer | None = None
        self._thread = threading.Thread(target=self._run, name="stream-learner-sdk", daemon=True)
        self._thread.start()

    # -- the public calls -------------------------------------------------

    def log_prediction(
        self,
        request_id: str,
        features: Mapping[str, FeatureValue],
        prediction: float | Mapping[str, float],
        *,
        model: str | None = None,
        model_version: str | None = None,
        event_time: int | None = None,
        event_id: str | None = None,
    ) -> str | None:
        """Log what was served for ``request_id``; return the event id, or None if dropped.

        A feature value is a number, a string (a category or a text), a list
        of numbers (a vector) or ``None`` (``prediction.v2``); whether it fits
        the model (a vector's length, a category's vocabulary) is the
        trainer's to say, which dead-letters an example that does not.
        Raises :class:`~stream_learner.errors.EventError` (naming the field)
        for an invalid event, e.g. a boolean, an object or a NaN feature value.
        """
        event_id = event_id or f"{self._id_prefix}-{next(self._ids)}"
        event = PREDICTION.convert(
            {
                "event_id": event_id,
                "request_id": request_id,
                "model": self.model if model is None else model,
                "model_version": self.model_version if model_version is None else model_version,
                "event_time": now_ms() if event_time is None else event_time,
                "features": features,
                "prediction": prediction,
            }
        )
        return self._enqueue(self.settings.topic_predictions, request_id, encode(event), "prediction", event_id)

    def log_label(
        self,
        request_id: str,
        label: str | float,
        *,
        event_time: int | None = None,
        event_id: str | None = None,
        model: str | None = None,
    ) -> str | None:
        """Log the true label of ``request_id``; return the event id, or None if dropped."""
        event_id = event_id or f"{self._id_prefix}-{next(self._ids)}"
        event = LABEL.convert(
            {
                "event_id": event_id,
                "request_id": request_id,
                "event_time": now_ms() if event_time is None else event_time,
                "label": label,
                "model": self.model if model is None else model,
            }
        )
        return self._enqueue(self.settings.topic_labels, request_id, encode(event), "label", event_id)

    @property
    def stats(self) -> SDKStats:
        """Sent, failed and dropped counts so far, and events not yet acknowledged."""
        with self._lock:
            return SDKStats(self._sent, self._failed, self._dropped, self._buffered_events)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every buffered event is acknowledged or failed; True if none is left."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while self._buffered_events:
                self._wake.set()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._room.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush, then stop the background thread and the producer."""
        self.flush(timeout_s)
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)
        # Anything still unacknowledged after close is lost: count it as failed.
        with self._lock:
            if self._buffered_events:
                self._failed += self._buffered_events
                self._buffered_events = self._buffered_bytes = 0

    def __enter__(self) -> PredictionLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------

    def _enqueue(self, topic: str, key: str, value: bytes, kind: str, event_id: str) -> str | None:
        size = len(value)
        with self._lock:
            if self._closing:
                raise RuntimeError("the logger is closed")
            if self._buffered_bytes + size > self.buffer_bytes:
                if self.on_full == "block":
                    deadline = time.monotonic() + self.block_timeout_s
                    while self._buffered_bytes + size > self.buffer_bytes and time.monotonic() < deadline:
                        self._room.wait(deadline - time.monotonic())
                if self._buffered_bytes + size > self.buffer_bytes:
                    self._dropped += 1
                    if self.metrics:
                        self.metrics.sdk_events.labels(type=kind, outcome="dropped").inc()
                    return None
            self._buffered_bytes += size
            self._buffered_events += 1
            self._queue.append((topic, key.encode(), value, kind))
        self._wake.set()
        return event_id

    def _done(self, size: int, kind: str, ok: bool) -> None:
        with self._lock:
            self._buffered_bytes -= size
            self._buffered_events -= 1
            if ok:
                self._sent += 1
            else:
                self._failed += 1
            self._room.notify_all()
        if self.metrics:
            self.metrics.sdk_events.labels(type=kind, outcome="sent" if ok else "failed").inc()
            self.metrics.sdk_buffered_bytes.set(self._buffered_bytes)

    def _connect(self) -> Producer | None:
        """Create the producer, retrying with backoff until it works or we close."""
        backoff = Backoff(0.1, 5.0)
        while not self._closing:
            try:
                # kafka-python 3 has no buffer_memory bound of its own: the
                # bound is ours, counted until the broker acknowledges.
                return make_producer(self.settings, **self._producer_options)
            except Exception as exc:  # noqa: BLE001 - keep buffering, try again
                delay = backoff.next_delay()
                log.warning("sdk_connect_failed", error=str(exc), retry_in_s=delay)
                self._wake.wait(delay)
        return None

    def _run(self) -> None:
        self._producer = self._connect()
        if self._producer is None:
            return
        queue, send = self._queue, self._producer.send
        while True:
            self._wake.wait(0.1)
            self._wake.clear()
            while queue:
                topic, key, value, kind = queue.popleft()
                size = len(value)
                try:
                    future = send(topic, key=key, value=value)
                except Exception as exc:  # noqa: BLE001 - a send error must not kill the thread
                    log.error("sdk_send_failed", topic=topic, error=str(exc))
                    self._done(size, kind, False)
                    continue
                future.add_callback(lambda _md, s=size, k=kind: self._done(s, k, True))
                future.add_errback(lambda exc, s=size, k=kind: self._on_error(exc, s, k))
            if self._closing and not queue:
                return

    def _on_error(self, exc: Exception, size: int, kind: str) -> None:
        log.error("sdk_delivery_failed", kind=kind, error=str(exc))
        self._done(size, kind, False)
