"""The joiner against the real local broker and Valkey: one behaviour per test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import msgspec
import pytest
from kafka import TopicPartition

from stream_learner.bus import H_ERROR_KIND, H_SOURCE_TOPIC, make_consumer
from stream_learner.config import Settings
from stream_learner.events import ExampleEvent
from stream_learner.join.examples import example_id

from ..procs import settings_env
from .helpers import RunningJoiner, advance_all, label, prediction, produce, read_examples, wait_until

T0 = 1_767_225_600_000
W = 10_000  # window, ms of event time


@pytest.fixture
def jsettings(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings,
        joiner_window_ms=W,
        joiner_late_retention_ms=60_000,
        joiner_orphan_retention_ms=30_000,
        joiner_group_id=f"{settings.topic_predictions}-joiner",
        joiner_redis_prefix=f"{{{settings.topic_predictions}}}:",
        joiner_idle_advance=False,
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
    )


def only(examples: list[ExampleEvent], *requests: str) -> dict[tuple[str, str], ExampleEvent]:
    """Examples of the given requests, keyed by (request, kind); fails on a repeated key."""
    out: dict[tuple[str, str], ExampleEvent] = {}
    for x in examples:
        if x.request_id in requests:
            assert (x.request_id, x.kind) not in out, f"{x.request_id} {x.kind} emitted twice"
            out[(x.request_id, x.kind)] = x
    return out


def has(request: str, kind: str):
    return lambda examples: any(x.request_id == request and x.kind == kind for x in examples)


@pytest.mark.slow
def test_label_within_window_is_labeled_with_lineage(jsettings: Settings) -> None:
    produce(jsettings, [prediction(1, T0), label(1, T0 + 1_000, "b")])
    with RunningJoiner(jsettings):
        examples = only(read_examples(jsettings, expect=1, timeout_s=20), "req-1")
    x = examples[("req-1", "labeled")]
    assert x.label == "b" and x.prediction == {"a": 0.7, "b": 0.3} and x.features["x"] >= 0
    assert (x.prediction_time, x.label_time) == (T0, T0 + 1_000)
    assert (x.prediction_event_id, x.label_event_id) == ("p-1", "l-1")
    assert x.prediction_source.topic == jsettings.topic_predictions and x.prediction_source.offset == 0
    assert x.label_source.topic == jsettings.topic_labels
    assert x.example_id == example_id("labeled", "p-1", "l-1")


@pytest.mark.slow
def test_early_label_waits_for_its_prediction(jsettings: Settings) -> None:
    with RunningJoiner(jsettings) as joiner:
        produce(jsettings, [label(2, T0 + 500)])
        wait_until(lambda: joiner.counts.early_labels == 1, what="the early label to be stored")
        produce(jsettings, [prediction(2, T0)])
        examples = only(read_examples(jsettings, expect=1, timeout_s=20), "req-2")
    assert set(examples) == {("req-2", "labeled")}


@pytest.mark.slow
def test_missing_label_becomes_unlabeled_when_the_watermark_passes(jsettings: Settings) -> None:
    produce(jsettings, [prediction(3, T0)])
    advance_all(jsettings, T0 + W - 1)  # not yet past the deadline
    with RunningJoiner(jsettings) as joiner:
        wait_until(lambda: joiner.counts.events["prediction"] >= 4, what="the events to be read")
        assert not only(read_examples(jsettings, timeout_s=1), "req-3")
        advance_all(jsettings, T0 + W + 1, tag="tock")
        examples = only(read_examples(jsettings, until=has("req-3", "unlabeled"), timeout_s=20), "req-3")
    x = examples[("req-3", "unlabeled")]
    assert x.label is None and x.label_event_id is None and x.label_source is None


@pytest.mark.slow
def test_late_label_after_window_closed(jsettings: Settings) -> None:
    produce(jsettings, [prediction(4, T0)])
    advance_all(jsettings, T0 + W + 1)
    with RunningJoiner(jsettings) as joiner:
        wait_until(lambda: joiner.counts.examples["unlabeled"] == 1, what="the window to close")
        produce(jsettings, [label(4, T0 + W + 5, "b")])
        examples = only(read_examples(jsettings, until=has("req-4", "late"), timeout_s=20), "req-4")
    assert set(examples) == {("req-4", "unlabeled"), ("req-4", "late")}
    assert examples[("req-4", "late")].label == "b"


@pytest.mark.slow
def test_label_past_deadline_in_event_time_gives_unlabeled_then_late(jsettings: Settings) -> None:
    # The window has not closed in the joiner yet, but in event time the label is late:
    # the examples are the same as if it had arrived after the window closed.
    produce(jsettings, [prediction(5, T0), label(5, T0 + W + 1)])
    with RunningJoiner(jsettings):
        examples = only(read_examples(jsettings, expect=2, timeout_s=20), "req-5")
    assert set(examples) == {("req-5", "unlabeled"), ("req-5", "late")}


@pytest.mark.slow
def test_duplicated_events_have_no_second_effect(jsettings: Settings) -> None:
    events = [prediction(6, T0), label(6, T0 + 10)]
    produce(jsettings, events + events + [prediction(6, T0 + 1, event_id="p-6-retry")])
    with RunningJoiner(jsettings) as joiner:
        wait_until(lambda: joiner.counts.duplicates == 3, what="three duplicates to be counted")
        examples = read_examples(jsettings, expect=1, timeout_s=5)
    assert [(x.request_id, x.kind, x.prediction_event_id) for x in examples] == [("req-6", "labeled", "p-6")]


@pytest.mark.slow
def test_orphan_label_is_dropped_after_retention(jsettings: Settings) -> None:
    produce(jsettings, [label(7, T0)])
    with RunningJoiner(jsettings) as joiner:
        wait_until(lambda: joiner.counts.early_labels == 1, what="the label to be stored")
        advance_all(jsettings, T0 + jsettings.joiner_orphan_retention_ms + 1)
        wait_until(lambda: joiner.counts.orphans_dropped == 1, what="the orphan to be dropped")
        assert (
            joiner.metrics.registry.get_sample_value(
                "stream_learner_joiner_joins_total", {"kind": "orphan_label_dropped"}
            )
            == 1
        )
        assert not joiner.store.client.exists(f"{jsettings.joiner_redis_prefix}r:req-7")


@pytest.mark.slow
def test_bad_events_go_to_the_dead_letter_topic_and_the_joiner_goes_on(jsettings: Settings) -> None:
    bad = [(jsettings.topic_predictions, b"{oops"), (jsettings.topic_labels, b'{"event_id": "x"}')]
    produce(jsettings, bad + [prediction(8, T0), label(8, T0 + 1)])
    with RunningJoiner(jsettings) as joiner:
        examples = only(read_examples(jsettings, expect=1, timeout_s=20), "req-8")
        wait_until(lambda: joiner.counts.dead_letters == 2, what="two dead letters")
    for kind in ("malformed_json", "missing_field"):
        assert (
            joiner.metrics.registry.get_sample_value(
                "stream_learner_dead_letters_total", {"stage": "joiner", "kind": kind}
            )
            == 1
        )
    assert ("req-8", "labeled") in examples
    consumer = make_consumer(jsettings, group_id=None)
    tp = TopicPartition(jsettings.topic_dlq, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    letters = [r for records in consumer.poll(5000).values() for r in records]
    consumer.close()
    kinds = {dict(r.headers)[H_SOURCE_TOPIC].decode(): dict(r.headers)[H_ERROR_KIND] for r in letters}
    assert kinds == {jsettings.topic_predictions: b"malformed_json", jsettings.topic_labels: b"missing_field"}


@pytest.mark.slow
def test_metrics_count_what_the_joiner_did(jsettings: Settings) -> None:
    produce(jsettings, [prediction(9, T0), label(9, T0 + 1)])
    advance_all(jsettings, T0 + 2)
    with RunningJoiner(jsettings) as joiner:
        wait_until(lambda: joiner.counts.examples["labeled"] == 4)
    sample = joiner.metrics.registry.get_sample_value
    assert sample("stream_learner_joiner_events_total", {"topic": jsettings.topic_predictions}) == 4
    assert sample("stream_learner_joiner_joins_total", {"kind": "labeled"}) == 4
    assert sample("stream_learner_joiner_redis_seconds_count") == joiner.counts.redis_calls > 0
    assert sample("stream_learner_joiner_watermark_lag_seconds") > 0


@pytest.mark.slow
def test_two_joiner_processes_in_one_group(jsettings: Settings, tmp_path) -> None:
    n = 3000
    events = []
    for i in range(n):
        events.append(prediction(i, T0 + i))
        if i % 10:
            events.append(label(i, T0 + i + 50))
    produce(jsettings, events)
    advance_all(jsettings, T0 + n + 10 * W)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "stream_learner.cli", "joiner"],
            env=settings_env(jsettings),
            stderr=(tmp_path / f"joiner{k}.log").open("w"),
        )
        for k in range(2)
    ]
    try:
        examples = read_examples(jsettings, expect=n, timeout_s=90)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
    logs = [(tmp_path / f"joiner{k}.log").read_text() for k in range(2)]
    kinds = {(x.request_id, x.kind) for x in examples if x.request_id.startswith("req-") and "tick" not in x.request_id}
    expected = {(f"req-{i}", "labeled" if i % 10 else "unlabeled") for i in range(n)}
    assert kinds == expected, logs[0][-2000:]
    # Both processes stopped cleanly on SIGTERM and both took part.
    assert all(p.returncode == 0 for p in procs), [log[-2000:] for log in logs]
    stopped = [json.loads(line) for log in logs for line in log.splitlines() if '"joiner_stopped"' in line]
    assert len(stopped) == 2


@pytest.mark.slow
def test_events_from_librdkafka_join(jsettings: Settings) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    producer = confluent_kafka.Producer({"bootstrap.servers": jsettings.bootstrap_servers, "enable.idempotence": True})
    n = 300
    for i in range(n):
        p = {
            "event_id": f"cp-{i}",
            "request_id": f"c-{i}",
            "model": "m",
            "model_version": "1",
            "event_time": T0 + i,
            "features": {"x": 1.0},
            "prediction": 0.5,
        }
        lab = {"event_id": f"cl-{i}", "request_id": f"c-{i}", "event_time": T0 + i + 1, "label": 1}
        # librdkafka's partitioner puts the label of a request on another
        # partition than kafka-python would: the join must not care.
        producer.produce(jsettings.topic_predictions, key=p["request_id"], value=json.dumps(p))
        producer.produce(jsettings.topic_labels, key=lab["request_id"], value=json.dumps(lab))
    assert producer.flush(30) == 0
    with RunningJoiner(jsettings):
        examples = read_examples(jsettings, expect=n, timeout_s=30)
    assert {(x.request_id, x.kind, x.label) for x in examples} == {(f"c-{i}", "labeled", 1.0) for i in range(n)}


@pytest.mark.slow
def test_when_traffic_stops_idle_inputs_let_wall_clock_close_windows(jsettings: Settings) -> None:
    idle = msgspec.structs.replace(
        jsettings, joiner_idle_advance=True, joiner_idle_timeout_ms=500, joiner_window_ms=500
    )
    from stream_learner.events import now_ms

    produce(idle, [prediction(10, now_ms())])  # one prediction, then silence
    with RunningJoiner(idle):
        examples = only(read_examples(idle, until=has("req-10", "unlabeled"), timeout_s=20), "req-10")
    assert set(examples) == {("req-10", "unlabeled")}


@pytest.mark.slow
def test_without_idle_advance_silence_keeps_windows_open(jsettings: Settings) -> None:
    quiet = msgspec.structs.replace(
        jsettings, joiner_idle_advance=False, joiner_idle_timeout_ms=500, joiner_window_ms=500
    )
    from stream_learner.events import now_ms

    produce(quiet, [prediction(11, now_ms())])
    with RunningJoiner(quiet) as joiner:
        wait_until(lambda: joiner.counts.events["prediction"] == 1)
        assert not only(read_examples(quiet, timeout_s=3), "req-11")
