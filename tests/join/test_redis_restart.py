"""Valkey stops and starts again while the joiner works: it retries, and no example is lost.

20,000 predictions (10% never labeled, 10% labeled before they come) are
produced in two halves; the second half trickles in while the joiner works
through the first, and Valkey is stopped (SIGTERM, it flushes its AOF) and
started again on the same port and data directory in the middle; a second
run kills it (SIGKILL) instead. The
examples topic, deduplicated by example id, must equal the offline oracle.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter

import pytest

from stream_learner.config import Settings
from stream_learner.events import ExampleEvent, LabelEvent, PredictionEvent
from stream_learner.local import LocalServers

from .helpers import RunningJoiner, advance_all, label, oracle_joiner, prediction
from .oracle import expected_examples, mismatches
from .test_crash import ExampleReader, produce_raw

#: Run with both Kafka clients, and the batch examples format on kafka-python (tests/conftest.py).
pytestmark = [pytest.mark.both_transports, pytest.mark.both_formats]

T0 = 1_767_225_600_000
W = 2_000
N = 20_000
SEED = 7_031
TICK_TAG = "tick"


def generate(n: int, seed: int) -> list[PredictionEvent | LabelEvent]:
    """Predictions every 10 ms of event time and their labels, in event-time order."""
    rng = random.Random(seed)
    timed: list[tuple[int, int, PredictionEvent | LabelEvent]] = []
    for i in range(n):
        pt = T0 + i * 10
        timed.append((pt, len(timed), prediction(f"r{i}", pt)))
        r = rng.random()
        if r < 0.10:
            continue  # never labeled
        lt = pt - rng.randint(1, 5) if r < 0.20 else pt + rng.randint(0, W)
        timed.append((lt, len(timed), label(f"r{i}", lt, rng.choice("ab"))))
    timed.sort(key=lambda x: (x[0], x[1]))
    return [ev for _, _, ev in timed]


def trickle(settings: Settings, events: list[PredictionEvent | LabelEvent], chunks: int = 40) -> None:
    """Produce ``events`` in ``chunks`` pieces, 0.15 s apart (a few seconds in all)."""
    step = -(-len(events) // chunks)
    for k in range(0, len(events), step):
        produce_raw(settings, events[k : k + step])
        time.sleep(0.15)


def redis_running(servers: LocalServers) -> bool:
    return servers.redis is not None and servers.redis.poll() is None


def stop_valkey(servers: LocalServers, how: str) -> None:
    if how == "sigterm":
        servers.stop_redis()  # Valkey flushes its AOF and exits
        return
    proc = servers.redis  # a crash: no flush, whatever the kernel has of the AOF survives
    assert proc is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    servers.redis = None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_valkey_restart_mid_stream_loses_nothing(settings: Settings, servers: LocalServers, how: str) -> None:
    started = time.monotonic()
    s = oracle_joiner(
        settings, W, "restart-joiner", consumer_session_timeout_ms=6000, consumer_max_poll_interval_ms=3000
    )
    stream = generate(N, SEED)
    oracle = expected_examples(stream, W)
    half = len(stream) // 2
    first, second = stream[:half], stream[half:]
    produce_raw(s, first)

    # The second half, while the joiner works and Valkey restarts.
    producer = threading.Thread(target=trickle, args=(s, second), daemon=True)
    reader = ExampleReader(s)
    downtime = 0.0
    seen_at_stop = -1
    try:
        with RunningJoiner(s) as joiner:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(reader.ids) < 500:
                reader.poll(100)
            assert reader.ids, "the joiner produced nothing before the restart"
            producer.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(reader.ids) < len(oracle.examples) // 4:
                reader.poll(100)
            seen_at_stop = len(reader.ids)
            stopped = time.monotonic()
            stop_valkey(servers, how)
            for _ in range(20):  # Valkey is down for ~2 s while the joiner keeps trying
                reader.poll(100)
            servers.start_redis()
            downtime = time.monotonic() - stopped
            producer.join(60)
            assert not producer.is_alive(), "producing the second half hung"
            last = max(ev.event_time for ev in stream)
            advance_all(s, last + 10 * W, partitions=s.partitions_input, tag=TICK_TAG)

            reader.read_until(oracle.examples.keys(), 90, linger_s=1)
    finally:
        if not redis_running(servers):
            servers.start_redis()  # other tests share this Valkey
    reader.drain()
    reader.close()

    examples: list[ExampleEvent] = [x for x in reader.records if not x.request_id.startswith(f"req-{TICK_TAG}-")]
    unique = {x.example_id: x for x in examples}
    retries = joiner.metrics.registry.get_sample_value("stream_learner_joiner_retries_total", {"dependency": "redis"})
    print(
        f"\nredis restart ({how}): {len(stream)} input events, {len(oracle.examples)} expected "
        f"{dict(oracle.counts())}; {seen_at_stop} examples before Valkey stopped, down {downtime:.1f}s; "
        f"topic held {len(examples)} ({len(examples) - len(unique)} duplicates); redis retries {retries}; "
        f"joiner counts {joiner.counts.examples}; total {time.monotonic() - started:.1f}s"
    )

    problems = mismatches(examples, oracle)
    assert not problems, "\n".join(problems)
    assert {(x.example_id, x.kind, x.request_id) for x in unique.values()} == oracle.keys()
    assert Counter(x.kind for x in unique.values()) == oracle.counts()
    assert 0 < seen_at_stop < len(oracle.examples), "Valkey was not restarted mid-stream"
    assert retries is not None and retries > 0, "the joiner never retried Redis"
    assert joiner.counts.dead_letters == 0
