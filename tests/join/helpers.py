"""Helpers for joiner tests: produce events, read examples back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from kafka import TopicPartition

from stream_learner.bus import make_consumer, make_producer
from stream_learner.config import Settings
from stream_learner.events import ExampleEvent, LabelEvent, PredictionEvent, encode
from stream_learner.events.batch import record_examples
from stream_learner.join.joiner import Joiner


def prediction(i: int | str, t: int, **kw: object) -> PredictionEvent:
    req = f"req-{i}"
    fields = dict(
        event_id=f"p-{i}",
        request_id=req,
        model="m",
        model_version="1",
        event_time=t,
        features={"x": float(hash(req) % 100)},
        prediction={"a": 0.7, "b": 0.3},
    )
    fields.update(kw)
    return PredictionEvent(**fields)  # type: ignore[arg-type]


def label(i: int | str, t: int, value: str = "a", **kw: object) -> LabelEvent:
    fields = dict(event_id=f"l-{i}", request_id=f"req-{i}", event_time=t, label=value)
    fields.update(kw)
    return LabelEvent(**fields)  # type: ignore[arg-type]


def oracle_joiner(settings: Settings, window_ms: int, name: str, **overrides: object) -> Settings:
    """Joiner settings under which the oracle (tests/join/oracle.py) holds: no state collected before
    the stream ends, the watermark moved by events only; group ``<predictions topic>-<name>`` and one
    hash tag per test's topics (so it runs on a cluster too)."""
    import msgspec

    base: dict[str, object] = dict(
        joiner_window_ms=window_ms,
        joiner_late_retention_ms=10**9,
        joiner_orphan_retention_ms=60_000,
        joiner_state_ttl_ms=2 * 10**9,
        joiner_idle_advance=False,
        joiner_group_id=f"{settings.topic_predictions}-{name}",
        joiner_redis_prefix="{" + settings.topic_predictions + "}:",
    )
    return msgspec.structs.replace(settings, **{**base, **overrides})


def produce(settings: Settings, events: Iterable[PredictionEvent | LabelEvent | tuple[str, bytes]]) -> None:
    """Send events in order (a ``(topic, raw bytes)`` pair sends raw bytes)."""
    producer = make_producer(settings)
    for ev in events:
        if isinstance(ev, tuple):
            producer.send(ev[0], key=b"raw", value=ev[1])
        else:
            topic = settings.topic_predictions if isinstance(ev, PredictionEvent) else settings.topic_labels
            producer.send(topic, key=ev.request_id.encode(), value=encode(ev))
    producer.flush()
    producer.close()


def advance_all(settings: Settings, t: int, partitions: int = 3, tag: str = "tick") -> None:
    """Put one prediction and one label at event time ``t`` on every input partition.

    The watermark is the minimum over partitions, so a test moves it by
    moving every partition (the events join each other and are ignored).
    """
    producer = make_producer(settings)
    for p in range(partitions):
        req = f"{tag}-{t}-{p}"
        producer.send(
            settings.topic_predictions, key=req.encode(), partition=p, value=encode(prediction(f"{tag}-{t}-{p}", t))
        )
        producer.send(settings.topic_labels, key=req.encode(), partition=p, value=encode(label(f"{tag}-{t}-{p}", t)))
    producer.flush()
    producer.close()


def read_examples(
    settings: Settings,
    timeout_s: float = 5.0,
    expect: int | None = None,
    until: Callable[[list[ExampleEvent]], bool] | None = None,
) -> list[ExampleEvent]:
    """Every example on the examples topic, waiting up to ``timeout_s`` for
    ``expect`` of them or for ``until(examples)`` to hold."""
    consumer = make_consumer(settings, group_id=None)
    parts = [
        TopicPartition(settings.topic_examples, p)
        for p in sorted(consumer.partitions_for_topic(settings.topic_examples) or [])
    ]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out: list[ExampleEvent] = []
    deadline = time.monotonic() + timeout_s

    def done() -> bool:
        return (expect is not None and len(out) >= expect) or (until is not None and until(out))

    while time.monotonic() < deadline and not done():
        for records in consumer.poll(200).values():
            for r in records:
                out.extend(record_examples(r))  # either format (stream_learner.events.batch)
    consumer.close()
    return out


def wait_until(condition, timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition()`` until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class RunningJoiner:
    """A joiner in a background thread, stopped cleanly on exit."""

    def __init__(self, settings: Settings, **kw: object) -> None:
        self.joiner = Joiner(settings, poll_timeout_ms=100, **kw)  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.joiner.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Joiner:
        self.thread.start()
        return self.joiner

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
