"""The count check behind ``stream-learner smoke``: SDK -> broker -> decoder -> joiner -> trainer.

An end-to-end check of the core's counts: every event the SDK acknowledged is
read back and decoded, every malformed record lands in the dead-letter topic
with the reason in its headers, the joiner emits exactly the examples the
sent events call for, and the trainer learns them and publishes signed
checkpoints.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..bus import DeadLetters, TopicPartition, make_consumer, make_producer
from ..config import Settings
from ..errors import EventError
from ..events import LABEL, PREDICTION, Codec, now_ms
from ..metrics import Metrics
from ..sdk import PredictionLogger

log = structlog.get_logger(__name__)


@dataclass
class DecodeReport:
    """What :func:`decode_topics` read: valid events by type, ids, dead letters by kind."""

    decoded: Counter[str] = field(default_factory=Counter)
    event_ids: set[str] = field(default_factory=set)
    dead_letters: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def decode_topics(
    settings: Settings,
    expected: int,
    *,
    timeout_s: float = 60.0,
    metrics: Metrics | None = None,
    group_id: str = "stream-learner-smoke",
) -> DecodeReport:
    """Read the prediction and label topics until ``expected`` records were seen.

    Valid records are decoded and counted; invalid ones go to the dead-letter
    topic. Offsets are committed only after the dead letters are acknowledged.
    """
    codecs: dict[str, tuple[str, Codec[Any]]] = {
        settings.topic_predictions: ("prediction", Codec(PREDICTION.event_type, settings.max_event_bytes)),
        settings.topic_labels: ("label", Codec(LABEL.event_type, settings.max_event_bytes)),
    }
    consumer = make_consumer(settings, group_id=None)
    producer = make_producer(settings)
    dlq = DeadLetters(producer, settings.topic_dlq, stage="smoke", metrics=metrics)
    parts = [TopicPartition(t, p) for t in codecs for p in sorted(consumer.partitions_for_topic(t) or [])]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    report = DecodeReport()
    seen = 0
    start = time.monotonic()
    try:
        while seen < expected and time.monotonic() - start < timeout_s:
            batch = consumer.poll(timeout_ms=500)
            pending = []
            for tp, records in batch.items():
                kind, codec = codecs[tp.topic]
                for record in records:
                    seen += 1
                    try:
                        event = codec.decode(record.value)
                    except EventError as exc:
                        report.dead_letters[exc.kind] += 1
                        pending.append(dlq.send(record, exc))
                        continue
                    report.decoded[kind] += 1
                    report.event_ids.add(event.event_id)
                    if metrics:
                        metrics.events_decoded.labels(type=kind).inc()
            producer.flush()
            for future in pending:
                future.get(timeout=30)  # the dead letter is durable before we move on
    finally:
        report.seconds = time.monotonic() - start
        consumer.close()
        producer.close()
    return report


def run_smoke(
    settings: Settings, events: int = 10_000, bad: int = 5, metrics: Metrics | None = None, seed: int = 7
) -> dict[str, Any]:
    """The foundation end to end; return a summary.

    Sends ``events`` predictions through the SDK with labels for 70% (within
    the window), late labels for 10% and none for 20%, plus ``bad`` malformed
    records; reads everything back and decodes it; then runs a joiner until
    every example is out, and checks the counts against what was sent.
    """
    rng = random.Random(seed)
    truth = [rng.gauss(0, 1) for _ in range(16)]  # the concept the trainer should learn
    window = settings.joiner_window_ms
    sent_ids: set[str] = set()
    expected = Counter[str]()
    t0 = time.monotonic()
    start_ms = now_ms()
    with PredictionLogger(settings=settings, model="demo", model_version="1", metrics=metrics) as sdk:
        for i in range(events):
            features = {f"f{j}": rng.gauss(0, 1) for j in range(16)}
            z = sum(w * features[f"f{j}"] for j, w in enumerate(truth))
            p = 1 / (1 + math.exp(-z))
            served = rng.random()  # the deployed model knows nothing yet
            t = start_ms + i // 10
            sent_ids.add(
                sdk.log_prediction(f"req-{i}", features, {"yes": served, "no": 1 - served}, event_time=t) or ""
            )
            fate = rng.random()
            if fate < 0.7:
                delay, kinds = rng.randrange(window), ["labeled"]
            elif fate < 0.8:
                delay, kinds = window + 1 + rng.randrange(window), ["unlabeled", "late"]
            else:
                expected["unlabeled"] += 1
                continue
            expected.update(kinds)
            label = "yes" if rng.random() < p else "no"
            sent_ids.add(sdk.log_label(f"req-{i}", label, event_time=t + delay) or "")
    produce_s = time.monotonic() - t0
    stats = sdk.stats
    raw = make_producer(settings)
    malformed = [
        b"{not json",
        b'{"event_id": "x"}',
        (
            b'{"event_id":"x","request_id":"r","model":"m",'
            b'"model_version":"1","event_time":1,"features":{"a":true},"prediction":0.5}'
        ),
        (
            b'{"event_id":"x","request_id":"r","model":"m","model_version":"1","event_time":1,'
            b'"features":{"a":NaN},"prediction":0.5}'
        ),
        b"\xff\xfe",
    ]
    for i in range(bad):
        raw.send(settings.topic_predictions, key=b"bad", value=malformed[i % len(malformed)])
    raw.flush()
    raw.close()
    report = decode_topics(settings, expected=stats.sent + bad, metrics=metrics)
    lost = sent_ids - report.event_ids
    joined = run_joiner_until(settings, expected, metrics=metrics)
    trained = run_trainer_until(settings, sum(expected.values()), metrics=metrics)
    return {
        "sdk_sent": stats.sent,
        "sdk_failed": stats.failed,
        "sdk_dropped": stats.dropped,
        "decoded": dict(report.decoded),
        "dead_letters": dict(report.dead_letters),
        "lost": len(lost),
        "examples_expected": dict(expected),
        "examples_joined": joined,
        "trainer": trained,
        "produce_seconds": round(produce_s, 3),
        "consume_seconds": round(report.seconds, 3),
    }


def run_joiner_until(
    settings: Settings, expected: Counter[str], *, metrics: Metrics | None = None, timeout_s: float = 120.0
) -> dict[str, int]:
    """Run a joiner in this process until it emitted ``expected`` examples (or time ran out)."""
    from ..join.joiner import Joiner

    joiner = Joiner(settings, metrics=metrics, poll_timeout_ms=100)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and any(joiner.counts.examples[kind] < n for kind, n in expected.items()):
            joiner.step()
    finally:
        joiner.close()
    return dict(joiner.counts.examples)


def run_trainer_until(
    settings: Settings, examples: int, *, metrics: Metrics | None = None, timeout_s: float = 120.0
) -> dict[str, object]:
    """Train the demo model on the joined examples; return what its last checkpoint says."""
    import tempfile
    from pathlib import Path

    import msgspec

    from ..checkpoint.signing import generate_keypair
    from ..learn.trainer import Trainer

    workdir = Path(tempfile.mkdtemp(prefix="stream-learner-demo-"))
    private_pem, _ = generate_keypair()
    (workdir / "signing.pem").write_bytes(private_pem)
    trainer_settings = msgspec.structs.replace(
        settings,
        trainer_model="demo",
        trainer_features=[f"f{j}" for j in range(16)],
        trainer_classes=["no", "yes"],
        trainer_signing_key=str(workdir / "signing.pem"),
        trainer_state_dir=str(workdir / "state"),
        trainer_checkpoint_every_examples=5000,
    )
    trainer = Trainer(trainer_settings, metrics=metrics)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and (sum(trainer.offsets.values()) < examples or trainer.buffer):
            trainer.step()
        # A checkpoint for what came after the last one, if anything did.
        last = (
            trainer.checkpoint() if trainer.session.since_checkpoint or not trainer.published else trainer.published[-1]
        )
    finally:
        trainer.close()
    return {
        "versions_published": [m.version for m in trainer.published],
        "counts": last.counts,
        "accuracy": round(last.metrics.get("accuracy", float("nan")), 4),
        "accuracy_rolling": round(last.metrics.get("accuracy_rolling", float("nan")), 4),
        "served_accuracy": round(last.metrics.get("served_accuracy", float("nan")), 4),
        "pseudo_precision": round(last.metrics.get("pseudo_precision", float("nan")), 4),
    }
