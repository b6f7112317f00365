"""The client SDK against the real local broker."""

from __future__ import annotations

import time

import msgspec
import pytest

from stream_learner.config import Settings
from stream_learner.errors import EventError
from stream_learner.local import free_port
from stream_learner.metrics import Metrics
from stream_learner.sdk import PredictionLogger
from stream_learner.tools.smoke import decode_topics

#: Run with both Kafka clients (tests/conftest.py).
pytestmark = pytest.mark.both_transports

N = 100_000


@pytest.mark.slow
def test_round_trip_100k_events_zero_loss(settings: Settings) -> None:
    metrics = Metrics()
    ids: list[str] = []
    with PredictionLogger(settings=settings, model="m", model_version="1", metrics=metrics) as sdk:
        for i in range(N):
            ids.append(sdk.log_prediction(f"req-{i}", {"a": float(i), "b": i % 7}, {"y": 0.3, "n": 0.7}))
            if i % 10 == 0:
                ids.append(sdk.log_label(f"req-{i}", "y" if i % 20 else "n"))
    assert None not in ids and len(set(ids)) == len(ids)
    assert sdk.stats.sent == len(ids) and sdk.stats.failed == 0 and sdk.stats.dropped == 0
    assert (
        metrics.registry.get_sample_value("stream_learner_sdk_events_total", {"type": "prediction", "outcome": "sent"})
        == N
    )

    report = decode_topics(settings, expected=len(ids), timeout_s=120)
    assert report.decoded == {"prediction": N, "label": N // 10}
    assert report.event_ids == set(ids)  # every id, none twice: counts matched above
    assert not report.dead_letters


def test_invalid_event_raises_on_the_callers_thread(settings: Settings) -> None:
    with PredictionLogger(settings=settings, model="m", model_version="1") as sdk:
        with pytest.raises(EventError, match=r"\$\.features\.b"):
            sdk.log_prediction("r", {"a": 1.0, "b": True}, 0.5)
        with pytest.raises(EventError, match=r"\$\.features\.b\[1\]"):
            sdk.log_prediction("r", {"a": 1.0, "b": [1.0, float("nan")]}, 0.5)
        with pytest.raises(EventError, match=r"\$\.features\.b"):
            sdk.log_prediction("r", {"a": 1.0, "b": float("nan")}, 0.5)
        with pytest.raises(EventError, match=r"\$\.model"):
            sdk.log_prediction("r", {"a": 1.0}, 0.5, model="")
        with pytest.raises(EventError, match=r"\$\.label"):
            sdk.log_label("r", float("inf"))
    assert sdk.stats.sent == 0


def unreachable() -> Settings:
    return Settings(bootstrap_servers=f"127.0.0.1:{free_port()}")


@pytest.mark.slow
def test_starts_without_a_broker_then_drops_when_full_without_blocking(kafka_client: str) -> None:
    start = time.monotonic()
    down = msgspec.structs.replace(unreachable(), kafka_client=kafka_client)
    sdk = PredictionLogger(settings=down, model="m", model_version="1", buffer_bytes=1000)
    # No broker answers, so nothing is acknowledged and the buffer stays full.
    results = [sdk.log_prediction(f"r{i}", {"a": 1.0}, 0.5) for i in range(100)]
    assert time.monotonic() - start < 1.0  # neither start-up nor logging waited on the broker
    kept = [r for r in results if r is not None]
    assert 0 < len(kept) < 10
    assert sdk.stats.dropped == 100 - len(kept)
    assert sdk.stats.buffered == len(kept)
    assert not sdk.flush(timeout_s=0.2)
    sdk.close(timeout_s=1)
    # What never reached the broker is reported, not silently lost.
    assert sdk.stats.failed == len(kept) and sdk.stats.sent == 0 and sdk.stats.buffered == 0


@pytest.mark.slow
def test_block_policy_waits_for_room_and_loses_nothing(settings: Settings) -> None:
    with PredictionLogger(
        settings=settings, model="m", model_version="1", buffer_bytes=4096, on_full="block", block_timeout_s=10
    ) as sdk:
        for i in range(2000):
            assert sdk.log_prediction(f"r{i}", {"a": float(i)}, 0.5) is not None
    assert sdk.stats.sent == 2000 and sdk.stats.dropped == 0
    assert decode_topics(settings, expected=2000).decoded["prediction"] == 2000


def test_delivery_failure_is_counted_as_failed(settings: Settings) -> None:
    # The producer refuses records over max_request_size; the good one still goes.
    with PredictionLogger(
        settings=settings, model="m", model_version="1", producer_options={"max_request_size": 2000}
    ) as sdk:
        sdk.log_prediction("big", {f"f{i}": float(i) for i in range(300)}, 0.5)
        sdk.log_prediction("small", {"a": 1.0}, 0.5)
    assert (sdk.stats.sent, sdk.stats.failed, sdk.stats.buffered) == (1, 1, 0)


def test_buffered_events_are_delivered_once_the_broker_is_reachable(settings: Settings) -> None:
    with PredictionLogger(settings=settings, model="m", model_version="1") as sdk:
        # Logged before the background thread can possibly have connected.
        ids = [sdk.log_label(f"r{i}", i % 2) for i in range(50)]
    assert sdk.stats.sent == 50
    assert decode_topics(settings, expected=50).event_ids == set(ids)


def test_closed_logger_refuses_new_events(settings: Settings) -> None:
    sdk = PredictionLogger(settings=settings, model="m", model_version="1")
    sdk.close()
    with pytest.raises(RuntimeError, match="closed"):
        sdk.log_label("r", 1)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="on_full"):
        PredictionLogger(settings=unreachable(), on_full="wait")  # type: ignore[arg-type]
