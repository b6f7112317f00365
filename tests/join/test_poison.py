"""Poison records against a real ``stream-learner joiner`` process, written by librdkafka as an application would.

Each poison record (nested 1,000 and 10,000 levels in an unknown field, a
feature value and the prediction; events of 2 MiB and 3 MB) is followed by
100 good predictions and their labels. Every poison record must end in the
dead-letter topic (the large ones truncated, with their size and digest), every
good pair must come out ``labeled``, and the one joiner process must never die.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from stream_learner.bus import H_ERROR_KIND, H_ORIGINAL_SHA256, H_ORIGINAL_SIZE, H_SOURCE_OFFSET, H_TRUNCATED
from stream_learner.config import Settings

from ..procs import read_topic, settings_env
from .helpers import read_examples

T0 = 1_767_225_600_000
GOOD_AFTER_EACH = 100


def prediction_json(i: int) -> dict:
    return {
        "event_id": f"p-{i}",
        "request_id": f"g-{i}",
        "model": "m",
        "model_version": "1",
        "event_time": T0 + i,
        "features": {"x": float(i % 7)},
        "prediction": {"a": 0.6, "b": 0.4},
    }


def poison_records() -> list[tuple[str, bytes, bytes]]:
    """(name, value, expected error kind) of each poison prediction."""
    text = json.dumps(prediction_json(-1))
    out = []
    for depth in (1_000, 10_000):
        nest = "[" * depth + "]" * depth
        out.append((f"{depth} deep in an unknown field", (text[:-1] + f', "zz": {nest}}}').encode(), b"too_deep"))
        out.append(
            (f"{depth} deep in a feature", text.replace('{"x": 6.0}', '{"x": ' + nest + "}").encode(), b"too_deep")
        )
        out.append(
            (f"{depth} deep in the prediction", text.replace('{"a": 0.6, "b": 0.4}', nest).encode(), b"too_deep")
        )
    for size in (2 << 20, 3_000_000):
        padding = "p" * (size - len(text) - len(', "pad": ""'))
        out.append((f"{size} bytes", (text[:-1] + f', "pad": "{padding}"}}').encode(), b"oversized"))
    return out


@pytest.mark.slow
def test_poison_records_go_to_the_dead_letter_topic_and_the_joiner_goes_on(settings: Settings, tmp_path: Path) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    s = msgspec.structs.replace(
        settings,
        joiner_window_ms=60_000,
        joiner_idle_advance=False,
        log_format="json",
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        joiner_group_id=f"{settings.topic_predictions}-poison",
        joiner_redis_prefix="{" + settings.topic_predictions + "}:",
    )
    poisons = poison_records()
    assert {len(v) for n, v, _ in poisons if "bytes" in n} == {2 << 20, 3_000_000}
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": s.bootstrap_servers, "enable.idempotence": True, "message.max.bytes": 8_000_000}
    )
    good = 0
    for _, value, _ in poisons:
        producer.produce(s.topic_predictions, key=b"poison", value=value, partition=0)
        for _ in range(GOOD_AFTER_EACH):
            p = prediction_json(good)
            lab = {"event_id": f"l-{good}", "request_id": p["request_id"], "event_time": T0 + good + 5, "label": "a"}
            # Partition 0 too: the good records come after the poison in the same partition.
            producer.produce(s.topic_predictions, key=p["request_id"], value=json.dumps(p), partition=0)
            producer.produce(s.topic_labels, key=p["request_id"], value=json.dumps(lab))
            good += 1
    assert producer.flush(60) == 0

    log = tmp_path / "joiner.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "joiner"], env=settings_env(s), stderr=log.open("w")
    )
    try:
        examples = read_examples(s, expect=good, timeout_s=120)
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    tail = log.read_text()[-3000:]
    assert alive, tail
    assert proc.returncode == 0, tail
    assert {(x.request_id, x.kind) for x in examples} == {(f"g-{i}", "labeled") for i in range(good)}, tail

    deadline = time.monotonic() + 30
    while len(letters := read_topic(s, s.topic_dlq)) < len(poisons) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(letters) == len(poisons), tail
    offsets = [(GOOD_AFTER_EACH + 1) * k for k in range(len(poisons))]
    by_offset = {int(dict(r.headers)[H_SOURCE_OFFSET]): r for r in letters}
    assert sorted(by_offset) == offsets
    for offset, (name, value, kind) in zip(offsets, poisons, strict=True):
        letter = by_offset[offset]
        headers = dict(letter.headers)
        assert headers[H_ERROR_KIND] == kind, name
        if len(value) > s.max_event_bytes:  # too large to carry whole: a prefix, with the size and digest
            assert headers[H_TRUNCATED] == b"true", name
            assert headers[H_ORIGINAL_SIZE] == str(len(value)).encode(), name
            assert headers[H_ORIGINAL_SHA256] == hashlib.sha256(value).hexdigest().encode(), name
            assert value.startswith(letter.value) and len(letter.value) < len(value), name
        else:
            assert letter.value == value and H_TRUNCATED not in headers, name
