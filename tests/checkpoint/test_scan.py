"""LatestScan, the serving side's start search, on the real broker: bounded in bytes as it reads."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kafka import KafkaProducer, TopicPartition

from stream_learner.bus import kafka_options
from stream_learner.checkpoint import fetch
from stream_learner.checkpoint.scan import LatestScan, ScanLimits
from stream_learner.config import Settings

from .test_publish_read import publish


@pytest.mark.slow
def test_small_records_before_large_ones_never_make_one_read_hold_more_than_the_window(
    settings: Settings, producer: Any, consumer: Any, keypair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = settings.topic_models
    _, _, signed = publish(producer, topic, keypair[0], 1, hidden=16, chunk_bytes=4096)
    junk = KafkaProducer(linger_ms=20, batch_size=1 << 20, max_request_size=2 << 20, **kafka_options(settings))
    for _ in range(30):  # 30 MiB of large records, then many tiny ones after them (read first)
        junk.send(topic, value=b"x" * (1 << 20), partition=0)
    junk.flush()
    last = [junk.send(topic, value=b"", partition=0) for _ in range(3000)][-1]
    junk.flush()
    last_offset = last.get(timeout=30).offset
    junk.close()
    held: list[int] = []
    real = fetch.RecordReader.read_range

    def measured(self: Any, tp: Any, lo: int, hi: int, max_bytes: int | None = None) -> Any:
        out = real(self, tp, lo, hi, max_bytes)
        held.append(sum(len(r.value or b"") for r in out))
        return out

    monkeypatch.setattr(fetch.RecordReader, "read_range", measured)
    tps = [TopicPartition(topic, 0)]
    # Tansu's end offset lags a batched produce by some records, and may take a while to move:
    # wait until it is past the large records and most of the tiny ones, and start from there.
    for _ in range(100):
        end = consumer.end_offsets(tps)
        if end[tps[0]] > last_offset - 1000:
            break
        time.sleep(0.1)
    scan = LatestScan(topic, keypair[1], "churn", limits=ScanLimits(window_bytes=4 << 20))
    scan.start(consumer.beginning_offsets(tps), end)
    found = None
    for _ in range(1000):
        found = scan.step(consumer)
        if found is not None:
            break
    assert found and found[0].manifest == signed
    assert scan.load(consumer, found[0]).manifest.version == 1
    # One window read holds at most the window's bytes plus one record (and one fetch past it).
    assert max(held) <= (4 << 20) + (2 << 20) + (1 << 20), max(held)
    assert scan.stats()["records"] >= end[tps[0]] - signed.weights.chunk_offsets[0] - 1
