"""Issue 18.1-18.5: a writer of the model topic without the key, against a node that starts or follows.

Each test runs on the real local broker. "A restarting node" is a new
subscriber with the same ``serving_state_dir`` as the one that served
before (the test's own directory, see conftest).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kafka import KafkaProducer

from stream_learner.bus import kafka_options
from stream_learner.checkpoint.publish import H_CHUNK_COUNT, H_CHUNK_INDEX, H_MODEL, H_SHA256, H_TYPE, H_VERSION
from stream_learner.config import Settings
from stream_learner.metrics import Metrics
from stream_learner.serving import CheckpointSubscriber

from .conftest import MODEL, ROW, publish, step_until
from .test_subscriber import failures, send_manifest_record

MANIFEST_HEADERS = [(H_TYPE, b"manifest"), (H_MODEL, MODEL.encode()), (H_VERSION, b"99")]


def served_then_stopped(settings: Settings, keypair: Any, version: int) -> None:
    """A node that served ``version`` and stopped (its floor is saved)."""
    sub = CheckpointSubscriber(settings, keypair[1], model=MODEL)
    try:
        step_until(sub, lambda: sub.version == version, what=f"v{version} before the restart")
    finally:
        sub.stop()


def settled(settings: Settings) -> None:
    """Wait until the model topic's end offsets stop moving (Tansu's lag a batched produce): the
    restarted node's scan then starts after everything the attack appended."""
    from kafka import TopicPartition

    from stream_learner.checkpoint import make_reader_consumer

    consumer = make_reader_consumer(settings)
    try:
        tps = [TopicPartition(settings.topic_models, p) for p in consumer.partitions_for_topic(settings.topic_models)]
        last: dict[Any, int] = {}
        for _ in range(100):
            now = consumer.end_offsets(tps)
            if now == last:
                return
            last = now
            time.sleep(0.3)
    finally:
        consumer.close()


def restarted(settings: Settings, keypair: Any, **kwargs: Any) -> tuple[CheckpointSubscriber, list[int]]:
    settled(settings)
    swaps: list[int] = []
    sub = CheckpointSubscriber(
        settings, keypair[1], model=MODEL, on_swap=lambda new, old: swaps.append(new.version), **kwargs
    )
    return sub, swaps


def raw_producer(settings: Settings, **options: Any) -> KafkaProducer:
    """A producer as an attacker has one: any record, batched."""
    return KafkaProducer(**{"linger_ms": 20, "batch_size": 1 << 20, **kafka_options(settings), **options})


# -- 18.1: what lies after the newest manifest at start ------------------------------------------


def _unsigned_4_bytes(producer: Any, settings: Settings, keypair: Any, other: Any, signed: dict) -> None:
    producer.send(
        settings.topic_models, key=MODEL.encode(), value=b"\x00\x01\x02\x03", headers=MANIFEST_HEADERS, partition=0
    ).get(timeout=30)


def _forged(producer: Any, settings: Settings, keypair: Any, other: Any, signed: dict) -> None:
    publish(producer, settings.topic_models, other[0], 4)  # a whole publish, signed by a key nobody trusts


def _unsigned_copy(producer: Any, settings: Settings, keypair: Any, other: Any, signed: dict) -> None:
    send_manifest_record(producer, settings.topic_models, msgspec.structs.replace(signed[3], version=4, signature=None))


def _deeply_nested(producer: Any, settings: Settings, keypair: Any, other: Any, signed: dict) -> None:
    nested = b'{"model":"m","version":99,"drift_state":{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}}"
    producer.send(settings.topic_models, key=MODEL.encode(), value=nested, headers=MANIFEST_HEADERS, partition=0).get(
        timeout=30
    )


START_ATTACKS = {
    "one unsigned 4-byte record": (_unsigned_4_bytes, "invalid"),
    "a forged manifest": (_forged, "signature"),
    "an unsigned manifest": (_unsigned_copy, "signature"),
    "a manifest nesting 10,000 levels": (_deeply_nested, "invalid"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(START_ATTACKS))
def test_a_restarting_node_serves_the_last_good_version_past_what_it_cannot_verify(
    case: str, settings: Settings, producer: Any, keypair: Any, other_keypair: Any
) -> None:
    attack, reason = START_ATTACKS[case]
    signed = {v: publish(producer, settings.topic_models, keypair[0], v) for v in (1, 2, 3)}
    served_then_stopped(settings, keypair, 3)
    for _ in range(3):  # several, so that the scan has to go past more than one
        attack(producer, settings, keypair, other_keypair, signed)
    metrics = Metrics()
    sub, swaps = restarted(settings, keypair, metrics=metrics)
    try:
        step_until(sub, lambda: sub.version == 3, timeout_s=20, what="v3 after a restart")
        status = sub.status()
        assert swaps == [3] and status["failures_by_reason"] == {reason: 3}, status
        assert failures(metrics, reason) == 3.0
        assert status["floor_version"] == 3 and status["catch_up"]["done"]
        assert sub.current.predict_one(ROW) == 12.0
        publish(producer, settings.topic_models, keypair[0], 5)
        step_until(sub, lambda: sub.version == 5, what="v5 followed after it")
    finally:
        sub.stop()


# -- 18.2: a replayed, validly signed old manifest -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("state", ["restarting node", "new node, no state"])
def test_a_replayed_old_manifest_is_never_served_at_start(
    state: str, settings: Settings, producer: Any, keypair: Any, tmp_path: Path
) -> None:
    signed = {v: publish(producer, settings.topic_models, keypair[0], v) for v in range(1, 6)}
    if state == "restarting node":
        served_then_stopped(settings, keypair, 5)
    else:
        settings = msgspec.structs.replace(settings, serving_state_dir=None)
    # The attacker replays v1's manifest record byte for byte, and v2's whole publish.
    send_manifest_record(producer, settings.topic_models, signed[1])
    publish(producer, settings.topic_models, keypair[0], 2)  # as an insider's old publish would be replayed
    send_manifest_record(producer, settings.topic_models, signed[2])
    sub, swaps = restarted(settings, keypair)
    try:
        step_until(sub, lambda: sub.version == 5, timeout_s=20, what="v5, the newest good version")
        assert swaps == [5], "an older version was served first"
        status = sub.status()
        assert status["floor_version"] == 5 and status["highest_verified_version"] == 5
    finally:
        sub.stop()


@pytest.mark.slow
def test_a_start_version_below_the_floor_is_refused_counted_and_shown(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    from stream_learner.serving import ServingNode, cold_start_model

    from .test_node import call

    signed = {v: publish(producer, settings.topic_models, keypair[0], v) for v in (1, 2, 3)}
    served_then_stopped(settings, keypair, 3)
    # The replay sits behind more junk than the start scan may read: it cannot be ruled out by the
    # versions behind it, only by the floor this node remembers.
    junk = raw_producer(settings)
    for _ in range(3000):
        junk.send(settings.topic_models, value=b"", partition=0)
    junk.flush()
    junk.close()
    send_manifest_record(producer, settings.topic_models, signed[1])
    small_scan = msgspec.structs.replace(settings, serving_scan_max_records=1000)
    metrics = Metrics()
    sub, swaps = restarted(small_scan, keypair, metrics=metrics)
    node = ServingNode(sub, metrics=metrics).start()
    try:
        step_until(sub, lambda: sub.status()["catch_up"].get("exhausted"), timeout_s=20, what="the scan's end")
        assert sub.current is None and swaps == []
        status = sub.status()
        assert status["failures_by_reason"] == {"downgrade": 1} and status["floor_version"] == 3
        info = call(node.url, "GET", "/model")[1]
        assert info["status"]["floor_version"] == 3 and info["status"]["failures_by_reason"] == {"downgrade": 1}
        text = call(node.url, "GET", "/metrics")[1]
        assert "stream_learner_serving_floor_version 3.0" in text
        assert 'stream_learner_serving_swap_failures_total{reason="downgrade"} 1.0' in text
        assert call(node.url, "GET", "/health")[0] == 503
        # Nor does the cold-start model (version 0) serve in its place: it is below the floor too.
        cold = msgspec.structs.replace(
            settings,
            trainer_model=MODEL,
            trainer_features=["a", "b"],
            trainer_task="regression",
            trainer_architecture="logreg",
        )
        cold_node = ServingNode(sub, metrics=Metrics(), fallback=cold_start_model(cold)).start()
        try:
            assert call(cold_node.url, "GET", "/health")[0] == 503
        finally:
            cold_node.stop()
        publish(producer, settings.topic_models, keypair[0], 4)
        step_until(sub, lambda: sub.version == 4, what="v4, published after the restart")
    finally:
        node.stop()
        sub.stop()


@pytest.mark.slow
@pytest.mark.parametrize("state", ["restarting node", "new node, no state"])
def test_a_replay_the_scan_cannot_rule_out_is_served_only_if_the_floor_vouches_for_it(
    state: str, settings: Settings, producer: Any, keypair: Any
) -> None:
    signed = {v: publish(producer, settings.topic_models, keypair[0], v) for v in (1, 2, 3)}
    served_then_stopped(settings, keypair, 3)
    junk = raw_producer(settings)
    for _ in range(3000):
        junk.send(settings.topic_models, value=b"", partition=0)
    junk.flush()
    junk.close()
    send_manifest_record(producer, settings.topic_models, signed[3])  # v3 again, its chunks far back
    small_scan = msgspec.structs.replace(settings, serving_scan_max_records=1000)
    if state != "restarting node":
        small_scan = msgspec.structs.replace(small_scan, serving_state_dir=None)
    sub, swaps = restarted(small_scan, keypair)
    try:
        step_until(sub, lambda: sub.status()["catch_up"].get("done"), timeout_s=20, what="the scan's end")
        sub.poll_once()
        if state == "restarting node":
            assert sub.version == 3 and swaps == [3]  # at the floor: no downgrade whatever hides behind it
        else:
            # Nothing vouches for it: something newer may hide behind the junk.
            assert sub.current is None and sub.status()["failures_by_reason"] == {"unconfirmed": 1}
    finally:
        sub.stop()


# -- 18.3: volume after the newest manifest ----------------------------------------------------------


@pytest.mark.slow
def test_a_restarting_node_becomes_ready_past_200000_empty_records(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    publish(producer, settings.topic_models, keypair[0], 1)
    publish(producer, settings.topic_models, keypair[0], 2)
    junk = raw_producer(settings)
    for _ in range(200_000):
        junk.send(settings.topic_models, value=b"", partition=0)
    junk.flush()
    junk.close()
    sub, swaps = restarted(settings, keypair)
    started = time.monotonic()
    try:
        sub.start(wait_s=60)
        assert sub.version == 2 and swaps == [2]
        assert time.monotonic() - started < 30
        assert sub.status()["catch_up"]["records"] >= 190_000  # Tansu's end offsets may lag a batched produce
    finally:
        sub.stop()


@pytest.mark.slow
def test_a_restarting_node_becomes_ready_past_a_record_over_100_mb(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    publish(producer, settings.topic_models, keypair[0], 1)
    publish(producer, settings.topic_models, keypair[0], 2)
    big = raw_producer(settings, max_request_size=120 * 1024 * 1024)
    big.send(settings.topic_models, value=b"x" * 110_000_000, partition=0).get(timeout=120)
    big.close()
    publish(producer, settings.topic_models, keypair[0], 1, model="other")  # records after it, too
    sub, swaps = restarted(settings, keypair)
    try:
        sub.start(wait_s=60)
        assert sub.version == 2 and swaps == [2]
        status = sub.status()
        assert status["skipped_records"] == 1 and status["last_skipped"]["partition"] == 0
    finally:
        sub.stop()


@pytest.mark.slow
def test_the_start_scan_makes_progress_across_broker_errors(
    settings: Settings, producer: Any, keypair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_learner.checkpoint import fetch
    from stream_learner.checkpoint.errors import ReadTimeoutError

    publish(producer, settings.topic_models, keypair[0], 1)
    junk = raw_producer(settings)
    for _ in range(20_000):
        junk.send(settings.topic_models, value=b"", partition=0)
    junk.flush()
    junk.close()
    real = fetch.RecordReader.read_range
    calls = [0]

    def flaky(self: Any, tp: Any, lo: int, hi: int, max_bytes: int | None = None) -> Any:
        calls[0] += 1
        if calls[0] % 3 == 0:  # every third window read fails, as a broker that keeps dropping out
            raise ReadTimeoutError("simulated")
        return real(self, tp, lo, hi, max_bytes)

    monkeypatch.setattr(fetch.RecordReader, "read_range", flaky)
    sub, _ = restarted(settings, keypair)
    try:
        step_until(sub, lambda: sub.version == 1, timeout_s=60, what="v1 despite the broker errors")
        status = sub.status()
        # Every record was read once: no step started again from the end. (Tansu's end offsets may
        # lag a batched produce: the scan starts from the end offset it was given.)
        assert 18_000 <= status["catch_up"]["records"] <= 20_006, status["catch_up"]
        assert status["failures_by_reason"]["broker"] >= 3
    finally:
        sub.stop()


# -- 18.4: junk chunks while following ------------------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_200000_junk_chunks_while_following_cost_bounded_memory_and_do_not_delay_a_swap(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    publish(producer, settings.topic_models, keypair[0], 1)
    sub, _ = restarted(settings, keypair)
    try:
        step_until(sub, lambda: sub.version == 1, what="v1")
        before = rss_kib()
        junk = raw_producer(settings)
        for i in range(200_000):
            # Chunks of versions that will never come: each kept until evicted.
            junk.send(
                settings.topic_models,
                key=MODEL.encode(),
                value=b"",
                partition=0,
                headers=[
                    (H_TYPE, b"chunk"),
                    (H_MODEL, MODEL.encode()),
                    (H_VERSION, str(10**9 + i).encode()),
                    (H_CHUNK_INDEX, b"0"),
                    (H_CHUNK_COUNT, b"1"),
                    (H_SHA256, b"0" * 64),
                ],
            )
        junk.flush()
        junk.close()
        step_until(sub, lambda: sub.status()["records_followed"] >= 200_000, timeout_s=120, what="the junk read")
        status = sub.status()
        assert status["window"]["records"] <= 4096
        grown_mib = (rss_kib() - before) / 1024
        assert grown_mib < 64, f"RSS grew {grown_mib:.0f} MiB"
        signed = publish(producer, settings.topic_models, keypair[0], 2)
        t = time.monotonic()
        step_until(sub, lambda: sub.version == 2, what="v2 after the junk")
        assert time.monotonic() - t < 5 and signed.version == 2
    finally:
        sub.stop()


# -- 18.5: a record larger than the receive limit while following -------------------------------


@pytest.mark.slow
def test_a_record_too_large_to_receive_is_skipped_counted_and_following_goes_on(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    small = msgspec.structs.replace(settings, serving_max_record_bytes=1 << 20)
    publish(producer, settings.topic_models, keypair[0], 1)
    metrics = Metrics()
    sub, _ = restarted(small, keypair, metrics=metrics)
    try:
        step_until(sub, lambda: sub.version == 1, what="v1")
        big = raw_producer(settings, max_request_size=8 * 1024 * 1024)
        offset = big.send(settings.topic_models, value=b"x" * 3_000_000, partition=0).get(timeout=60).offset
        big.close()
        publish(producer, settings.topic_models, keypair[0], 2)
        step_until(sub, lambda: sub.version == 2, timeout_s=30, what="v2 after the oversized record")
        status = sub.status()
        assert status["skipped_records"] == 1 and status["last_skipped"] == {"partition": 0, "offset": offset}
        assert status["failures_by_reason"] == {"oversized": 1}
        text = metrics.registry.get_sample_value("stream_learner_serving_skipped_records_total")
        assert text == 1.0
    finally:
        sub.stop()
