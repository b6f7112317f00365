"""Crash test: a joiner process SIGKILLed at random moments loses no example and invents none.

100,000 predictions and their labels (10% never labeled, 10% labeled a few
ms before the prediction and produced first, some late, 2% of the events
re-sent shortly after the original, 0.5% orphan labels) are produced in
event-time order. A real ``stream-learner joiner`` process then works
through them and is SIGKILLed at seeded random moments (0.3-3 s after it
started, or, two runs in three, 0.05-0.8 s after it produced its first
example from new input, so most kills hit it mid-cycle rather than while it
starts or joins the group), at least ``KILLS`` times, restarted each time; a last run finishes.
The examples topic, deduplicated by example id, must equal the offline
oracle (:mod:`.oracle`) exactly.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from stream_learner.bus import make_consumer, make_producer
from stream_learner.config import Settings, load_settings
from stream_learner.events import ExampleEvent, LabelEvent, PredictionEvent, encode
from stream_learner.events.batch import record_examples

from ..procs import settings_env
from .helpers import advance_all, label, oracle_joiner, prediction
from .oracle import OracleResult, expected_examples, mismatches

#: Run with both Kafka clients, and the batch examples format on kafka-python (tests/conftest.py).
pytestmark = [pytest.mark.both_transports, pytest.mark.both_formats]

T0 = 1_767_225_600_000
W = 5_000  # window, ms of event time
ORPHAN_RETENTION = 60_000
N = 100_000
KILLS = 10
SEED = 20_240_611
TICK_TAG = "tick"


def joiner_settings(settings: Settings) -> Settings:
    return oracle_joiner(
        settings,
        W,
        "crash-joiner",
        joiner_orphan_retention_ms=ORPHAN_RETENTION,
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        log_format="json",
    )


def generate(n: int, seed: int) -> list[PredictionEvent | LabelEvent]:
    """The input stream in production order: event-time order, duplicates re-sent shortly after."""
    rng = random.Random(seed)
    timed: list[tuple[int, int, PredictionEvent | LabelEvent]] = []
    seq = 0

    def add(ev: PredictionEvent | LabelEvent) -> None:
        nonlocal seq
        timed.append((ev.event_time, seq, ev))
        seq += 1

    for i in range(n):
        pt = T0 + i * 10
        add(prediction(f"c{i}", pt))
        r = rng.random()
        value = rng.choice("ab")
        if r < 0.10:
            continue  # never labeled
        if r < 0.20:
            lt = pt - rng.randint(1, 5)  # early: before the prediction, so produced first
        elif r < 0.26:
            lt = pt + W + rng.randint(1, 3 * W)  # late
        elif r < 0.27:
            lt = pt + W + rng.choice((0, 1))  # the window's edge: W is still in, W + 1 is late
        else:
            lt = pt + rng.randint(0, W)
        add(label(f"c{i}", lt, value))
    for j in range(n // 200):  # orphans: labels whose prediction never comes
        add(label(f"o{j}", T0 + rng.randint(0, n * 10), rng.choice("ab")))
    timed.sort(key=lambda x: (x[0], x[1]))
    stream: list[PredictionEvent | LabelEvent] = [ev for _, _, ev in timed]
    # 2% re-sent a few positions after the original.
    dups = sorted(rng.sample(range(len(stream)), len(stream) // 50), reverse=True)
    for k in dups:
        stream.insert(min(len(stream), k + 1 + rng.randint(0, 5)), stream[k])
    return stream


def produce_raw(settings: Settings, stream: list[PredictionEvent | LabelEvent]) -> None:
    producer = make_producer(settings, linger_ms=20)
    for ev in stream:
        topic = settings.topic_predictions if isinstance(ev, PredictionEvent) else settings.topic_labels
        producer.send(topic, key=ev.request_id.encode(), value=encode(ev))
    producer.flush(timeout=120)
    producer.close()


class ExampleReader:
    """Reads the examples topic from the beginning, incrementally."""

    def __init__(self, settings: Settings) -> None:
        self.consumer: KafkaConsumer = make_consumer(settings, group_id=None)
        self.parts = [
            TopicPartition(settings.topic_examples, p)
            for p in sorted(self.consumer.partitions_for_topic(settings.topic_examples) or [])
        ]
        self.consumer.assign(self.parts)
        self.consumer.seek_to_beginning(*self.parts)
        self.records: list[ExampleEvent] = []
        self.ids: set[str] = set()

    def poll(self, timeout_ms: int = 100) -> int:
        got = 0
        for records in self.consumer.poll(timeout_ms).values():
            for r in records:
                for x in record_examples(r):  # either format (stream_learner.events.batch)
                    self.records.append(x)
                    self.ids.add(x.example_id)
                    got += 1
        return got

    def read_until(
        self,
        wanted: AbstractSet[str],
        timeout_s: float,
        *,
        linger_s: float,
        check: Callable[[], None] = lambda: None,
        stall_s: float = 20.0,
    ) -> float:
        """Read until every id in ``wanted`` was seen, nothing new came for ``stall_s`` (what
        is missing will not come) or ``timeout_s`` passed, calling ``check`` between polls;
        then ``linger_s`` more, so examples that should not exist have their chance to show up.
        Returns when the last new example arrived (``time.monotonic()``)."""
        deadline = time.monotonic() + timeout_s
        progress = time.monotonic()
        while time.monotonic() < deadline and not wanted <= self.ids:
            if self.poll(200):
                progress = time.monotonic()
            elif time.monotonic() - progress > stall_s:
                break
            check()
        end = time.monotonic() + linger_s
        while time.monotonic() < end:
            self.poll(200)
        return progress

    def end(self) -> int:
        """How many records the examples topic holds now."""
        return sum(self.consumer.end_offsets(self.parts).values())

    def drain(self, timeout_s: float = 30.0) -> None:
        """Read up to the current end of the topic."""
        end = self.consumer.end_offsets(self.parts)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(self.consumer.position(tp) < end[tp] for tp in self.parts):
            self.poll(200)

    def close(self) -> None:
        self.consumer.close()


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no stderr)"


def is_tick(request_id: str) -> bool:
    return request_id.startswith(f"req-{TICK_TAG}-")


def start_joiner(env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "joiner"], env=env, stdout=log, stderr=log, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_joiner_sigkilled_at_random_loses_nothing_and_invents_nothing(
    settings: Settings,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    s = joiner_settings(settings)
    stream = generate(N, SEED)
    oracle: OracleResult = expected_examples(stream, W)
    produce_raw(s, stream)
    last = max(ev.event_time for ev in stream)
    # Every input partition moves far past every deadline and the orphan retention.
    advance_all(s, last + 10 * ORPHAN_RETENTION, partitions=s.partitions_input, tag=TICK_TAG)
    produced_at = time.monotonic()

    rng = random.Random(SEED)
    env = settings_env(s)
    assert load_settings(env=env) == s, "the joiner process would not get these settings"
    stderr_path = tmp_path / "joiner.stderr"
    reader = ExampleReader(s)
    client = redis.Redis.from_url(s.redis_url)
    kills = 0
    killed_working = 0  # killed runs that had produced examples: the kill hit a working joiner
    kill_log: list[str] = []
    proc: subprocess.Popen[bytes] | None = None
    with stderr_path.open("ab") as log:
        try:
            for round_ in range(KILLS):
                log.write(f"\n===== run {round_} (killed) =====\n".encode())
                log.flush()
                end_before = reader.end()
                # A restarted joiner first re-emits the outbox (before it even joins the group).
                reclaimed = client.zcard(s.joiner_redis_prefix + "ob")
                proc = start_joiner(env, log)
                spawned = time.monotonic()
                anchor = spawned
                if round_ % 3:
                    # Two runs in three count from the first example this run produced from new
                    # input, so the kill lands mid-cycle rather than while it starts or joins the group.
                    while time.monotonic() - spawned < 30 and reader.end() <= end_before + reclaimed:
                        reader.poll(50)
                    anchor = time.monotonic()
                # Short runs once working: a fast joiner would otherwise finish the
                # whole stream in a few runs and leave later kills nothing to interrupt.
                kill_at = anchor + (rng.uniform(0.05, 0.8) if round_ % 3 else rng.uniform(0.3, 3.0))
                while time.monotonic() < kill_at:
                    reader.poll(50)
                assert proc.poll() is None, f"joiner exited on its own ({proc.returncode}):\n{tail(stderr_path)}"
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills += 1
                killed_working += reader.end() > end_before + reclaimed
                kill_log.append(
                    f"{'work' if round_ % 3 else 'start'}+{kill_at - anchor:.1f}s"
                    f"={time.monotonic() - spawned:.1f}s/{reclaimed}+{reader.end() - end_before - reclaimed}ex"
                )

            log.write(b"\n===== final run =====\n")
            log.flush()
            proc = start_joiner(env, log)
            final_started = time.monotonic()

            def alive() -> None:
                assert proc.poll() is None, f"joiner exited on its own ({proc.returncode}):\n{tail(stderr_path)}"

            done_at = reader.read_until(oracle.examples.keys(), 150, linger_s=2, check=alive)
        finally:
            if proc is not None:
                stop(proc, signal.SIGTERM)
    assert proc is not None
    clean_exit = proc.returncode
    reader.drain()
    reader.close()

    examples = [x for x in reader.records if not is_tick(x.request_id)]
    unique: dict[str, ExampleEvent] = {}
    for x in examples:
        unique.setdefault(x.example_id, x)
    duplicates = len(examples) - len(unique)
    print(
        f"\ncrash test: {len(stream)} input events, {len(oracle.examples)} expected examples "
        f"{dict(oracle.counts())}, {len(oracle.orphans)} orphans; examples topic held {len(examples)} "
        f"({duplicates} duplicates); {kills} SIGKILLs {kill_log}; produce {produced_at - started:.1f}s, "
        f"kill phase {final_started - produced_at:.1f}s, final run {done_at - final_started:.1f}s, "
        f"total {time.monotonic() - started:.1f}s"
    )

    dump = tmp_path / "examples.jsonl"
    dump.write_bytes(b"\n".join(msgspec.json.encode(x) for x in reader.records))
    context = f"\n(examples read back: {dump})\n--- joiner stderr (tail) ---\n{tail(stderr_path)}"
    problems = mismatches(examples, oracle)
    assert not problems, "\n".join(problems) + context
    got = {(x.example_id, x.kind, x.request_id) for x in unique.values()}
    assert got == oracle.keys(), context
    assert Counter(x.kind for x in unique.values()) == oracle.counts(), context
    assert kills >= KILLS and killed_working >= KILLS // 2, kill_log
    assert clean_exit == 0, f"joiner did not stop cleanly on SIGTERM ({clean_exit})" + context

    # Orphan labels were collected once the watermark passed their retention,
    # and the clean stop acknowledged everything it emitted.
    try:
        left = sum(client.exists(f"{s.joiner_redis_prefix}r:{req}") for req in oracle.orphans)
        assert left == 0, f"{left} orphan labels still in Redis" + context
        assert client.zcard(s.joiner_redis_prefix + "ob") == 0, "outbox not empty after a clean stop" + context
    finally:
        client.close()
    # Nothing was dead-lettered.
    dlq = make_consumer(s, group_id=None)
    try:
        parts = [TopicPartition(s.topic_dlq, p) for p in sorted(dlq.partitions_for_topic(s.topic_dlq) or [0])]
        assert sum(dlq.end_offsets(parts).values()) == 0, "dead letters were produced" + context
    finally:
        dlq.close()
