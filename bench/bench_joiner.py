"""Joiner benchmark: throughput against raw kafka-python, Redis round trips, flat memory.

Everything runs in one process against freshly started local servers (Tansu
and Valkey on free ports). The joiner is the real
:class:`stream_learner.join.joiner.Joiner`, stepped in this process, and each
rate is paired with a raw-consume baseline measured just before it, because
absolute numbers on a shared machine move a lot between runs while the
ratios do not.

Phases:

1. produce   -- N prediction events (16 features, 2 classes) and their label
                events (~10 % of predictions get none; label delays 1-500 ms
                of event time, inside the 5 s window, so every label joins
                as ``labeled``) to the prediction and label topics
                (3 partitions each), in event-time order, keyed by request id.
2. raw consume -- a group-less ``make_consumer`` consumer (same fetch
                settings and ``max_poll_records`` as the joiner) assigned to
                the 6 input partitions, reading the 2N records without
                decoding: the ceiling for a Python consumer.
   consume + produce -- the same consumer, and per poll one example-sized
                record produced for every prediction record (every prediction
                yields one example), flushed and acknowledged as the joiner
                does before it commits; no Redis, no decoding. The Kafka I/O
                that any kafka-python joiner pays: its ceiling.
3. joiner    -- a fresh ``Joiner`` (new group id, new Redis prefix) steps
                until it has consumed the 2N records; every labeled example
                is out by then. The clock starts when the first non-empty
                step returns (the consumer-group join, which lasts a
                rebalance timeout on Tansu, and that first batch are left
                out; the rate counts only the records after it). Then one
                far-future prediction + label is produced to every input
                partition, the joiner steps until the watermark has closed
                every remaining window, and the examples are checked:
                exactly the expected labeled and unlabeled counts (plus one
                labeled example per partition for those sentinels), no late
                ones, and the examples topic read back holds exactly that
                many records, all with distinct example ids. Window 5 s,
                late and orphan retention 10 s (state is collected during
                the run, as in a steady state). Run twice, with
                ``joiner_max_poll_records`` 5000 and 500, each on its own
                copy of the input topics and after its own two baselines.
4. round trips -- ``INFO commandstats`` deltas over each joiner run: the
                commands that clients sent (``EVALSHA``, ``WAITAOF``, one-off
                ``SCRIPT LOAD`` / connection setup) per poll, and, apart, the
                commands ``join.lua`` ran inside Redis (server work, which
                grows with the batch). A client-side count of the commands
                sent on the joiner's connections cross-checks the first number.
5. memory    -- M input events (default 1M) streamed in chunks of 100k:
                produce a chunk, step the joiner until it has consumed it,
                sample this process's VmRSS and Valkey's ``used_memory``,
                repeat. Window 2 s, late and orphan retention 5 s, so join
                state is collected as the watermark moves. Flat means the
                last sample over the first one after warm-up is about 1.

Each joiner step is broken into stages by wrapping the instance's own
methods (poll, decode, progress, Redis send, the wait for the previous
step's ``WAITAOF``, build examples, produce, commit, Redis receive, observe;
the rest is bookkeeping), so a slow joiner shows where its time goes
without a profiler. The joiner overlaps the Redis call of one
batch with the produce of the previous one, so "Redis receive" is only the
wait left over. Each timed phase also reports the CPU time per input event
of this process, Valkey and Tansu (all threads, from /proc): on a small
machine they compete for the same cores. ``--profile FILE`` also runs
cProfile over the timed loop of the first run (that run's rate is then not
comparable).

Run::

    .venv/bin/python bench/bench_joiner.py [--events N] [--memory-events M]

Results go to ``bench/results/joiner.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import heapq
import importlib.metadata
import itertools
import json
import logging
import os
import pstats
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import redis
import redis.utils
from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import NewTopic

from stream_learner.bus import kafka_options, make_consumer, make_producer
from stream_learner.config import Settings
from stream_learner.events import EXAMPLE, LABEL, PREDICTION, LabelEvent, PredictionEvent, Source, encode
from stream_learner.join.examples import encode_example
from stream_learner.join.joiner import Joiner
from stream_learner.join.records import Emission, StoredLabel, StoredPrediction
from stream_learner.join.store import RedisJoinStore
from stream_learner.local import LocalServers
from stream_learner.logging import configure_logging
from stream_learner.redis_conn import redis_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "joiner.json"
N_FEATURES = 16
PARTITIONS = 3
MODEL, MODEL_VERSION = "bench", "1"
SEED = 20240601
T0 = 1_767_225_600_000  # 2026-01-01, event time of the first prediction
UNLABELED_FRACTION = 0.10
MAX_LABEL_DELAY_MS = 500
WINDOW_MS = 5000
STEP_TIMEOUT_S = 300.0

#: The commands join.lua runs inside Redis: counted apart from the client's round trips.
SCRIPT_COMMANDS = {c.lower() for c in re.findall(r"redis\.call\('(\w+)'", RedisJoinStore.SCRIPT)}
#: Commands this benchmark itself sends to Valkey (not the joiner's).
OWN_COMMANDS = {"info", "flushall", "dbsize"}


# -- data ---------------------------------------------------------------------


def event_stream(
    n_predictions: int | None, *, seed: int, tag: str, t0: int = T0, step_ms: int = 1
) -> Iterator[tuple[str, bytes, bytes]]:
    """Predictions (one every ``step_ms`` of event time) and their labels, in event-time order.

    Yields ``(role, key, value)``; role is ``"prediction"`` or ``"label"``.
    Unbounded when ``n_predictions`` is None (the memory phase slices it).
    Features come from a pool of pre-drawn 16-feature dicts, so generating a
    million events costs little next to producing them.
    """
    rng = random.Random(seed)
    names = [f"f{j}" for j in range(N_FEATURES)]
    pool = [{name: rng.gauss(0.0, 1.0) * 10 ** rng.randint(-2, 3) for name in names} for _ in range(4096)]
    pending: list[tuple[int, int, bytes, bytes]] = []  # (time, i, key, value) of labels not yet due
    counter = range(n_predictions) if n_predictions is not None else itertools.count()
    for i in counter:
        t = t0 + i * step_ms
        while pending and pending[0][0] <= t:
            _, _, key, value = heapq.heappop(pending)
            yield "label", key, value
        rid = f"{tag}-{i}"
        key = rid.encode()
        p = rng.random()
        yield (
            "prediction",
            key,
            encode(
                PredictionEvent(
                    event_id=f"p-{tag}-{i}",
                    request_id=rid,
                    model=MODEL,
                    model_version=MODEL_VERSION,
                    event_time=t,
                    features=pool[i & 4095],
                    prediction={"yes": p, "no": 1.0 - p},
                )
            ),
        )
        if rng.random() >= UNLABELED_FRACTION:
            lt = t + rng.randint(1, MAX_LABEL_DELAY_MS)
            value = encode(
                LabelEvent(
                    event_id=f"l-{tag}-{i}", request_id=rid, event_time=lt, label="yes" if rng.random() < p else "no"
                )
            )
            heapq.heappush(pending, (lt, i, key, value))
    while pending:
        _, _, key, value = heapq.heappop(pending)
        yield "label", key, value


# -- Kafka helpers ------------------------------------------------------------


def create_topics(settings: Settings, names: dict[str, int]) -> None:
    admin = KafkaAdminClient(request_timeout_ms=30_000, **kafka_options(settings))
    try:
        admin.create_topics([NewTopic(n, p, 1) for n, p in names.items()], timeout_ms=30_000)
    finally:
        admin.close()


def produce_stream(producer: Any, settings: Settings, stream: Iterator[tuple[str, bytes, bytes]]) -> dict[str, int]:
    """Send a stream to the input topics, flush, and fail loudly if the broker refused any."""
    topics = {"prediction": settings.topic_predictions, "label": settings.topic_labels}
    counts = {"prediction": 0, "label": 0}
    send = producer.send
    futures = []
    for role, key, value in stream:
        futures.append(send(topics[role], key=key, value=value))
        counts[role] += 1
    producer.flush()
    failed = sum(1 for f in futures if not f.succeeded())
    if failed:
        raise SystemExit(f"{failed} records were not acknowledged by the broker")
    return counts


def advance_watermark(settings: Settings, t: int, tag: str, partitions: int = PARTITIONS) -> int:
    """One prediction and its label at event time ``t`` on every input partition, explicitly.

    The watermark is the minimum over all input partitions, so this moves it
    to ``t`` and closes every window before it. Each pair joins as one
    labeled example; returns how many.
    """
    producer = make_producer(settings)
    try:
        for p in range(partitions):
            rid = f"{tag}-watermark-{p}"
            producer.send(
                settings.topic_predictions,
                key=rid.encode(),
                partition=p,
                value=encode(
                    PredictionEvent(
                        event_id=f"p-{rid}",
                        request_id=rid,
                        model=MODEL,
                        model_version=MODEL_VERSION,
                        event_time=t,
                        features={"f0": 0.0},
                        prediction={"yes": 0.5, "no": 0.5},
                    )
                ),
            )
            producer.send(
                settings.topic_labels,
                key=rid.encode(),
                partition=p,
                value=encode(LabelEvent(event_id=f"l-{rid}", request_id=rid, event_time=t, label="yes")),
            )
        producer.flush()
    finally:
        producer.close()
    return partitions


def read_examples(settings: Settings, expect: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """Read the examples topic back: records, distinct example ids, and records per kind.

    Stops once ``expect`` records are read and a further second brings
    nothing (so an extra record would be seen), or after ``timeout_s``.
    """
    consumer = make_consumer(settings, None)
    try:
        parts = consumer.partitions_for_topic(settings.topic_examples) or set()
        tps = [TopicPartition(settings.topic_examples, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ids: set[str] = set()
        kinds: dict[str, int] = {}
        records = 0
        deadline = time.monotonic() + timeout_s
        quiet_since = None
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            got = 0
            for recs in batch.values():
                for r in recs:
                    x = EXAMPLE.decode(r.value)
                    ids.add(x.example_id)
                    kinds[x.kind] = kinds.get(x.kind, 0) + 1
                got += len(recs)
            records += got
            if got:
                quiet_since = None
            elif records >= expect:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 1.0:
                    break
        end = sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()
    return {"records": records, "distinct_ids": len(ids), "kinds": kinds, "end_offsets": end}


# -- phase 2: raw consume -----------------------------------------------------


def phase_raw_consume(
    settings: Settings, n: int, max_poll_records: int, partitions: int = PARTITIONS
) -> dict[str, float]:
    """A group-less consumer on all input partitions, values not decoded.

    Timed like the joiner: from the return of the first non-empty poll, over
    the records after it.
    """
    consumer = make_consumer(settings, None, max_poll_records=max_poll_records)
    try:
        tps = [
            TopicPartition(t, p) for t in (settings.topic_predictions, settings.topic_labels) for p in range(partitions)
        ]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        seen, first, t0 = 0, 0, None
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while seen < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"raw consume read only {seen}/{n} records")
            got = sum(len(r) for r in consumer.poll(timeout_ms=100).values())
            seen += got
            if got and t0 is None:
                t0, first, cpu0 = time.perf_counter(), got, cpu_seconds()
        t1, cpu1 = time.perf_counter(), cpu_seconds()
    finally:
        consumer.close()
    if seen != n:
        raise SystemExit(f"raw consume read {seen} records, expected {n}")
    assert t0 is not None
    return {
        "seconds": t1 - t0,
        "records": seen - first,
        "events_per_s": (seen - first) / (t1 - t0),
        "cpu_us_per_event": cpu_per_record(cpu0, cpu1, seen - first),
    }


def sample_example(settings: Settings) -> bytes:
    """An encoded labeled example as the joiner builds it from the workload's first prediction and label."""
    pred = lab = None
    for role, _, value in event_stream(50, seed=SEED, tag="r"):
        if role == "prediction" and pred is None:
            pred = PREDICTION.decode(value)
        elif role == "label" and pred is not None and lab is None:
            candidate = LABEL.decode(value)
            if candidate.request_id == pred.request_id:
                lab = candidate
    assert pred is not None and lab is not None
    emission = Emission(
        "labeled",
        StoredPrediction(
            "w",
            pred.event_time,
            pred.event_id,
            pred.request_id,
            pred.model,
            pred.model_version,
            msgspec.json.encode(pred.features),
            msgspec.json.encode(pred.prediction),
            Source(settings.topic_predictions, 0, 123456),
        ),
        StoredLabel("e", lab.event_time, lab.event_id, lab.label, Source(settings.topic_labels, 0, 123456)),
    )
    return encode_example(emission)


def phase_consume_produce(
    settings: Settings, n: int, max_poll_records: int, tag: str, example: bytes
) -> dict[str, float]:
    """The Kafka I/O any kafka-python joiner does, and nothing else.

    A group-less consumer reads the 2N inputs (values not decoded) and, per
    poll, produces one example-sized record for every prediction record
    (every prediction yields exactly one example) with ``make_producer``,
    flushes and waits for every acknowledgement, as the joiner does before
    it commits. No Redis, no decoding, no commit. Timed like the joiner.
    """
    topic = f"bench.floor.{tag}"
    create_topics(settings, {topic: 1})
    consumer = make_consumer(settings, None, max_poll_records=max_poll_records)
    producer = make_producer(settings)
    try:
        producer.send(topic, key=b"warmup", value=example).get(timeout=30)  # connected before the clock
        tps = [
            TopicPartition(t, p) for t in (settings.topic_predictions, settings.topic_labels) for p in range(PARTITIONS)
        ]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        seen, first, produced, t0 = 0, 0, 0, None
        predictions = settings.topic_predictions
        send = producer.send
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while seen < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"consume+produce read only {seen}/{n} records")
            batch = consumer.poll(timeout_ms=100)
            futures = [
                send(topic, key=r.key, value=example)
                for tp, records in batch.items()
                if tp.topic == predictions
                for r in records
            ]
            producer.flush()
            for f in futures:
                f.get(timeout=60)
            got = sum(len(r) for r in batch.values())
            seen += got
            produced += len(futures)
            if got and t0 is None:
                t0, first, cpu0 = time.perf_counter(), got, cpu_seconds()
        t1, cpu1 = time.perf_counter(), cpu_seconds()
    finally:
        consumer.close()
        producer.close()
    assert t0 is not None
    return {
        "seconds": t1 - t0,
        "records": seen - first,
        "produced": produced,
        "cpu_us_per_event": cpu_per_record(cpu0, cpu1, seen - first),
        "example_bytes": len(example),
        "events_per_s": (seen - first) / (t1 - t0),
    }


# -- instrumentation ----------------------------------------------------------


def counting_connection_class(sent: dict[str, int]) -> type[redis.Connection]:
    """A redis-py connection class that counts the commands sent through it into ``sent``.

    It counts at the connection, so the joiner's own calls (the store sends
    ``EVALSHA`` and ``WAITAOF`` on a connection it holds, not through
    ``execute_command``) are seen along with connection setup and health checks.
    """

    def count(name: Any) -> None:
        key = (name.decode() if isinstance(name, bytes) else str(name)).lower()
        sent[key] = sent.get(key, 0) + 1

    class CountingConnection(redis.Connection):
        def send_command(self, *args: Any, **kwargs: Any) -> None:
            count(args[0])
            super().send_command(*args, **kwargs)

        def pack_commands(self, commands: Any) -> Any:
            for command in commands:
                count(command[0])
            return super().pack_commands(commands)

    return CountingConnection


class Stages:
    """Wall time per stage of ``Joiner.step``, by wrapping the instance's own methods.

    Nothing in the product changes: the wrappers are instance attributes
    that shadow the bound methods ``step`` calls.
    """

    NAMES = (
        "poll",
        "decode",
        "progress",
        "redis_send",
        "wait_aof",
        "build_examples",
        "produce",
        "commit",
        "redis_receive",
        "observe",
    )

    def __init__(self, joiner: Joiner) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self.calls = dict.fromkeys(self.NAMES, 0)
        self.active = False
        self._wrap(joiner.consumer, "poll", "poll")
        self._wrap(joiner, "_progress", "progress")
        self._wrap(joiner.store, "send", "redis_send")
        self._wrap(joiner.store, "receive", "redis_receive")
        self._wrap(joiner.store, "wait_durable", "wait_aof")
        self._wrap(joiner, "_examples", "build_examples")
        self._wrap(joiner, "_produce", "produce")
        self._wrap(joiner, "_decode", "decode")
        self._wrap(joiner, "_commit", "commit")
        self._wrap(joiner, "_observe", "observe")

    def _wrap(self, obj: Any, attr: str, stage: str) -> None:
        inner = getattr(obj, attr)
        seconds, calls, perf = self.seconds, self.calls, time.perf_counter

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return inner(*args, **kwargs)
            start = perf()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[stage] += perf() - start
                calls[stage] += 1

        setattr(obj, attr, wrapper)


def valkey_commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    return {k.removeprefix("cmdstat_"): v for k, v in client.info("commandstats").items()}


def commandstats_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    out = {}
    for name, stats in after.items():
        calls = stats["calls"] - before.get(name, {}).get("calls", 0)
        if calls and name not in OWN_COMMANDS:
            b = before.get(name, {})
            out[name] = {
                "calls": calls,
                "usec": stats["usec"] - b.get("usec", 0),
                "errors": (
                    stats.get("failed_calls", 0)
                    + stats.get("rejected_calls", 0)
                    - b.get("failed_calls", 0)
                    - b.get("rejected_calls", 0)
                ),
            }
    return out


#: Processes whose CPU time each timed phase reports (set in ``main``): this one, Valkey, Tansu.
PIDS: dict[str, int | str] = {"bench": "self"}


def cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds so far of each process in :data:`PIDS` (all threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in PIDS.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return out


def cpu_per_record(before: dict[str, float], after: dict[str, float], records: int) -> dict[str, float]:
    """CPU microseconds per timed record of each process between two :func:`cpu_seconds` samples."""
    return {k: 1e6 * (after[k] - before[k]) / records for k in after if k in before}


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process from /proc (no psutil)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def step_until(joiner: Joiner, done: Callable[[], bool], what: str, timeout_s: float = STEP_TIMEOUT_S) -> None:
    """Step until ``done()``, then finish the last cycle (the joiner produces a batch's examples,
    and commits its offsets, during the next step)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"joiner timed out waiting for {what}: counts={joiner.counts}")
        joiner.step()
    joiner.flush()


def consumed(joiner: Joiner) -> int:
    return joiner.counts.events["prediction"] + joiner.counts.events["label"]


# -- phase 3 + 4: joiner throughput and round trips ---------------------------


def joiner_settings(settings: Settings, tag: str, **overrides: Any) -> Settings:
    return msgspec.structs.replace(
        settings,
        joiner_group_id=f"bench-joiner-{tag}-{uuid.uuid4().hex[:8]}",
        joiner_redis_prefix=f"{{bench-{tag}}}:",
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        joiner_idle_advance=False,
        **overrides,
    )


def phase_joiner(
    settings: Settings,
    admin: redis.Redis,
    tag: str,
    max_poll_records: int,
    expected: dict[str, int],
    profile: Path | None = None,
) -> dict[str, Any]:
    n = expected["prediction"] + expected["label"]
    s = joiner_settings(
        settings,
        tag,
        joiner_max_poll_records=max_poll_records,
        joiner_window_ms=WINDOW_MS,
        # Short retention, so that state is collected during the run, as in a steady state.
        joiner_late_retention_ms=10_000,
        joiner_orphan_retention_ms=10_000,
        topic_examples=f"bench.examples.{tag}",
    )
    create_topics(s, {s.topic_examples: 1})
    gc.collect()
    stats0 = valkey_commandstats(admin)
    sent: dict[str, int] = {}
    client = redis.Redis.from_url(s.redis_url, connection_class=counting_connection_class(sent), **redis_options(s))
    t_created = time.perf_counter()
    joiner = Joiner(s, poll_timeout_ms=100, redis_client=client)
    stages = Stages(joiner)
    profiler = cProfile.Profile() if profile else None
    try:
        # Group join: on Tansu this lasts a rebalance timeout; the first batch ends it.
        deadline = time.monotonic() + 60
        first = 0
        while first == 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"joiner got no records within 60 s: counts={joiner.counts}")
            first = joiner.step()
        t0 = time.perf_counter()
        join_wait = t0 - t_created
        cpu0 = cpu_seconds()
        polls0 = joiner.counts.polls
        stages.active = True
        if profiler:
            profiler.enable()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        step = joiner.step
        while consumed(joiner) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"joiner consumed only {consumed(joiner)}/{n} records: counts={joiner.counts}")
            step()
        joiner.flush()  # the last batch's examples and commit: inside the timed loop
        t1, cpu1 = time.perf_counter(), cpu_seconds()
        if profiler:
            profiler.disable()
        stages.active = False
        counts_main = json.loads(json.dumps(joiner.counts.__dict__))
        polls = joiner.counts.polls
        stats1 = valkey_commandstats(admin)
        sent = dict(sent)
        if consumed(joiner) != n or joiner.counts.examples["labeled"] != expected["labeled"]:
            raise SystemExit(
                f"after consuming: counts={joiner.counts}, expected {n} events and "
                f"{expected['labeled']} labeled examples"
            )

        # Close the remaining windows: move every partition's event time far ahead.
        sentinels = advance_watermark(s, T0 + 10**9, tag)
        want_labeled = expected["labeled"] + sentinels
        step_until(
            joiner,
            lambda: (
                joiner.counts.examples["labeled"] >= want_labeled
                and joiner.counts.examples["unlabeled"] >= expected["unlabeled"]
            ),
            "the watermark to close every window",
        )
        # A few more steps: anything extra (duplicates, late) would show up.
        for _ in range(3):
            joiner.step()
        counts_final = json.loads(json.dumps(joiner.counts.__dict__))
    finally:
        joiner.close()
    on_topic = read_examples(s, want_labeled + expected["unlabeled"])
    ex = counts_final["examples"]
    want_total = want_labeled + expected["unlabeled"]
    problems = []
    if ex["labeled"] != want_labeled:
        problems.append(f"labeled {ex['labeled']} != {want_labeled}")
    if ex["unlabeled"] != expected["unlabeled"]:
        problems.append(f"unlabeled {ex['unlabeled']} != {expected['unlabeled']}")
    if ex["late"] != 0:
        problems.append(f"late {ex['late']} != 0")
    if on_topic["records"] != want_total or on_topic["distinct_ids"] != want_total:
        problems.append(
            f"examples topic holds {on_topic['records']} records, {on_topic['distinct_ids']} distinct "
            f"ids (end offsets {on_topic['end_offsets']}), expected {want_total}"
        )
    if counts_final["dead_letters"] or counts_final["duplicates"]:
        problems.append(f"dead letters {counts_final['dead_letters']}, duplicates {counts_final['duplicates']}")
    if problems:
        raise SystemExit(f"joiner run {tag}: WRONG EXAMPLES: " + "; ".join(problems))

    delta = commandstats_delta(stats0, stats1)
    client_cmds = {k: v for k, v in delta.items() if k not in SCRIPT_COMMANDS}
    script_cmds = {k: v for k, v in delta.items() if k in SCRIPT_COMMANDS}
    # A call that failed (the first EVALSHA answers NOSCRIPT; redis-py loads the script and retries)
    # is a one-off, counted apart from the per-poll calls.
    per_poll_cmds = {k: v["calls"] - v["errors"] for k, v in client_cmds.items() if k in ("evalsha", "eval", "waitaof")}
    one_off = {k: v["calls"] for k, v in client_cmds.items() if k not in per_poll_cmds}
    one_off.update({f"{k} (failed)": v["errors"] for k, v in client_cmds.items() if k in per_poll_cmds and v["errors"]})
    timed_polls = polls - polls0
    seconds = t1 - t0
    records = n - first
    result: dict[str, Any] = {
        "max_poll_records": max_poll_records,
        "group_join_seconds": join_wait,
        "first_batch_records": first,
        "seconds": seconds,
        "records": records,
        "events_per_s": records / seconds,
        "timed_polls": timed_polls,
        "records_per_poll": records / timed_polls,
        "polls": polls,
        "counts_after_consume": counts_main,
        "counts_final": counts_final,
        "examples_on_topic": on_topic,
        "expected_examples": {
            "labeled": want_labeled,
            "unlabeled": expected["unlabeled"],
            "late": 0,
            "watermark_sentinels": sentinels,
        },
        "redis": {
            "client_commands": client_cmds,
            "script_commands": script_cmds,
            "round_trips_per_poll": sum(per_poll_cmds.values()) / polls,
            "round_trips_per_poll_by_command": {k: v / polls for k, v in per_poll_cmds.items()},
            "one_off_commands": one_off,
            "client_side_sent": sent,
            "client_side_round_trips_per_poll": sum(sent.values()) / polls,
            "script_commands_per_poll": sum(v["calls"] for v in script_cmds.values()) / polls,
            "script_commands_per_event": sum(v["calls"] for v in script_cmds.values()) / n,
            "evalsha_server_usec_per_event": delta.get("evalsha", {}).get("usec", 0) / n,
        },
        "cpu_us_per_event": cpu_per_record(cpu0, cpu1, records),
        "stages_seconds": stages.seconds,
        "stages_calls": stages.calls,
    }
    if profiler and profile:
        profiler.dump_stats(str(profile))
        result["profile"] = str(profile)
    return result


# -- phase 5: memory ----------------------------------------------------------


def phase_memory(
    settings: Settings, admin: redis.Redis, servers: LocalServers, total: int, chunk: int
) -> dict[str, Any]:
    s = joiner_settings(
        settings,
        "mem",
        joiner_window_ms=2000,
        joiner_late_retention_ms=5000,
        joiner_orphan_retention_ms=5000,
        topic_predictions="bench.mem.predictions",
        topic_labels="bench.mem.labels",
        topic_examples="bench.mem.examples",
    )
    create_topics(s, {s.topic_predictions: PARTITIONS, s.topic_labels: PARTITIONS, s.topic_examples: 1})
    admin.flushall()  # the throughput runs' state: this Valkey is the benchmark's own
    gc.collect()
    stream = event_stream(None, seed=SEED + 1, tag="m")
    producer = make_producer(s)
    joiner = Joiner(s, poll_timeout_ms=100)
    samples: list[dict[str, Any]] = []
    produced = 0
    t_start = time.perf_counter()
    join_seconds = 0.0
    try:
        while produced < total:
            size = min(chunk, total - produced)
            produce_stream(producer, s, itertools.islice(stream, size))
            produced += size
            t = time.perf_counter()
            step_until(joiner, lambda produced=produced: consumed(joiner) >= produced, f"{produced} events consumed")
            join_seconds += time.perf_counter() - t
            mem = admin.info("memory")
            p = s.joiner_redis_prefix
            sample = {
                "events": produced,
                "elapsed_s": time.perf_counter() - t_start,
                "joiner_rss_bytes": rss_bytes(),
                "valkey_used_memory": int(mem["used_memory"]),
                "valkey_rss_bytes": rss_bytes(servers.redis.pid) if servers.redis else None,
                "tansu_rss_bytes": rss_bytes(servers.kafka.pid) if servers.kafka else None,
                "valkey_keys": admin.dbsize(),
                "due": admin.zcard(p + "due"),
                "gc": admin.zcard(p + "gc"),
                "outbox_entries": admin.zcard(p + "ob"),
                "watermark_event_ms_after_t0": int(admin.get(p + "wmv") or T0 - 1) - T0,
                "examples": dict(joiner.counts.examples),
                "orphans_dropped": joiner.counts.orphans_dropped,
            }
            samples.append(sample)
            print(
                f"  memory: {produced:>9,} events  rss {sample['joiner_rss_bytes'] / 2**20:7.1f} MiB  "
                f"valkey used {sample['valkey_used_memory'] / 2**20:6.1f} MiB  keys {sample['valkey_keys']:>6}  "
                f"tansu rss {(sample['tansu_rss_bytes'] or 0) / 2**20:7.0f} MiB  "
                f"{sample['elapsed_s']:5.0f}s",
                flush=True,
            )
        if consumed(joiner) != total:
            raise SystemExit(f"memory phase consumed {consumed(joiner)} events, produced {total}")
        counts = json.loads(json.dumps(joiner.counts.__dict__))
    finally:
        producer.close()
        joiner.close()
    warm = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]
    return {
        "events": total,
        "chunk": chunk,
        "settings": {
            "window_ms": s.joiner_window_ms,
            "late_retention_ms": s.joiner_late_retention_ms,
            "orphan_retention_ms": s.joiner_orphan_retention_ms,
        },
        "wall_seconds": time.perf_counter() - t_start,
        "joiner_seconds": join_seconds,
        "samples": samples,
        "counts": counts,
        "first_after_warmup_events": warm["events"],
        "rss_ratio": last["joiner_rss_bytes"] / warm["joiner_rss_bytes"],
        "valkey_used_memory_ratio": last["valkey_used_memory"] / warm["valkey_used_memory"],
        "valkey_keys_ratio": last["valkey_keys"] / max(1, warm["valkey_keys"]),
    }


# -- driver -------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    runs = result["joiner_runs"]
    print(
        f"\nN={result['predictions']} predictions + {result['labels']} labels = {result['input_events']} "
        f"input events; expected {result['expected']['labeled']} labeled, "
        f"{result['expected']['unlabeled']} unlabeled\n"
    )
    head = (
        f"{'run':<22} {'events/s':>9} {'raw/s':>9} {'ratio':>6} {'c+p/s':>9} {'c+p ratio':>9} "
        f"{'vs c+p':>6} {'rec/poll':>8} {'rt/poll':>7} {'lua cmds/ev':>11} {'join wait':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        cp = r["consume_produce"]
        print(
            f"joiner max_poll={r['max_poll_records']:<7} {r['events_per_s']:>9,.0f} "
            f"{r['baseline']['events_per_s']:>9,.0f} {r['ratio']:>6.3f} {cp['events_per_s']:>9,.0f} "
            f"{cp['ratio']:>9.3f} {r['ratio_to_consume_produce']:>6.3f} {r['records_per_poll']:>8.0f} "
            f"{r['redis']['round_trips_per_poll']:>7.3f} {r['redis']['script_commands_per_event']:>11.2f} "
            f"{r['group_join_seconds']:>8.1f}s"
        )
    print(
        "(ratio: joiner / raw consume; c+p: consume + produce one example per prediction, no Redis; "
        "vs c+p: joiner / c+p)"
    )
    print("\nCPU per timed input event, us (all threads of each process; the machine's other load not included):")
    for r in runs:
        for name, phase in (("raw consume", r["baseline"]), ("consume+produce", r["consume_produce"]), ("joiner", r)):
            cpu = phase.get("cpu_us_per_event", {})
            print(
                f"  max_poll={r['max_poll_records']:<5} {name:<16} wall {1e6 / phase['events_per_s']:6.1f}  "
                + "  ".join(f"{k} {v:6.1f}" for k, v in cpu.items())
            )
    print()
    for r in runs:
        rd = r["redis"]
        print(
            f"max_poll={r['max_poll_records']}: {r['polls']} polls; per poll "
            + ", ".join(f"{k} {v:.3f}" for k, v in rd["round_trips_per_poll_by_command"].items())
            + f"; one-off {rd['one_off_commands']}; client-side count {rd['client_side_round_trips_per_poll']:.3f}"
            f"/poll; EVALSHA server time {rd['evalsha_server_usec_per_event']:.1f} us/event"
        )
    print("\nwhere a timed step's wall time goes (% of the timed loop, us per input event):")
    names = list(runs[0]["stages_seconds"]) + ["rest (decode, bookkeeping)"]
    print(f"{'stage':<28}" + "".join(f"{'mp=' + str(r['max_poll_records']):>20}" for r in runs))
    for name in names:
        cells = []
        for r in runs:
            sec = r["stages_seconds"].get(name, r["seconds"] - sum(r["stages_seconds"].values()))
            cells.append(f"{100 * sec / r['seconds']:>10.1f}% {1e6 * sec / r['records']:>7.2f}us")
        print(f"{name:<28}" + "".join(f"{c:>20}" for c in cells))
    m = result.get("memory")
    if m:
        print(
            f"\nmemory over {m['events']:,} input events (chunks of {m['chunk']:,}; ratios: last / sample at "
            f"{m['first_after_warmup_events']:,}):"
        )
        print(
            "  joiner RSS (MiB):      "
            + " ".join(f"{x['joiner_rss_bytes'] / 2**20:.0f}" for x in m["samples"])
            + f"   ratio {m['rss_ratio']:.3f}"
        )
        print(
            "  Valkey used (MiB):     "
            + " ".join(f"{x['valkey_used_memory'] / 2**20:.1f}" for x in m["samples"])
            + f"   ratio {m['valkey_used_memory_ratio']:.3f}"
        )
        print(
            "  Valkey keys:           "
            + " ".join(str(x["valkey_keys"]) for x in m["samples"])
            + f"   ratio {m['valkey_keys_ratio']:.3f}"
        )
        print(
            "  Tansu RSS (MiB):       "
            + " ".join(f"{(x['tansu_rss_bytes'] or 0) / 2**20:.0f}" for x in m["samples"])
            + "   (in-memory broker: grows by design)"
        )
        print(
            f"  joiner throughput while interleaved: {m['events'] / m['joiner_seconds']:,.0f} events/s "
            f"(includes one group join); phase wall {m['wall_seconds']:.0f}s"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="predictions N (N labels minus ~10%%)")
    ap.add_argument("--memory-events", type=int, default=1_000_000, help="input events of the memory phase (0: skip)")
    ap.add_argument("--memory-chunk", type=int, default=100_000)
    ap.add_argument(
        "--max-poll", type=int, nargs="+", default=[5000, 500], help="joiner_max_poll_records of each joiner run"
    )
    ap.add_argument(
        "--profile", type=Path, default=None, help="cProfile the timed loop of the first joiner run into this file"
    )
    ap.add_argument(
        "--kafka-log-level",
        default="ERROR",
        help="level of kafka-python's loggers (WARNING shows its I/O thread's "
        "'blocking the event loop' warnings while the joiner holds the GIL)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_logging("warning")
    logging.getLogger("kafka").setLevel(args.kafka_log_level.upper())
    info = machine_info()
    info["redis_py"] = importlib.metadata.version("redis")
    info["hiredis_available"] = bool(redis.utils.HIREDIS_AVAILABLE)

    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "joiner",
        "partitions": PARTITIONS,
        "features": N_FEATURES,
        "window_ms": WINDOW_MS,
        "max_label_delay_ms": MAX_LABEL_DELAY_MS,
        "unlabeled_fraction": UNLABELED_FRACTION,
    }
    with LocalServers(Settings(partitions_input=PARTITIONS)) as srv:
        settings = srv.settings
        admin = redis.Redis.from_url(settings.redis_url)
        PIDS.update({"valkey": srv.redis.pid if srv.redis else 0, "tansu": srv.kafka.pid if srv.kafka else 0})
        info["valkey"] = admin.info("server").get("valkey_version") or admin.info("server")["redis_version"]

        example = sample_example(settings)
        runs = []
        for i, mp in enumerate(args.max_poll):
            tag = f"run{i + 1}-mp{mp}"
            # Fresh input topics per run (the same workload): a run's watermark sentinels stay out of the next.
            s = msgspec.structs.replace(
                settings, topic_predictions=f"bench.{tag}.predictions", topic_labels=f"bench.{tag}.labels"
            )
            create_topics(s, {s.topic_predictions: PARTITIONS, s.topic_labels: PARTITIONS})
            t = time.perf_counter()
            producer = make_producer(s)
            counts = produce_stream(producer, s, event_stream(args.events, seed=SEED, tag="r"))
            producer.close()
            n = counts["prediction"] + counts["label"]
            expected = {
                "prediction": counts["prediction"],
                "label": counts["label"],
                "labeled": counts["label"],
                "unlabeled": counts["prediction"] - counts["label"],
            }
            print(
                f"produced {counts['prediction']} predictions + {counts['label']} labels in "
                f"{time.perf_counter() - t:.1f}s",
                flush=True,
            )
            result.update(predictions=counts["prediction"], labels=counts["label"], input_events=n, expected=expected)
            base = phase_raw_consume(s, n, mp)
            floor = phase_consume_produce(s, n, mp, tag, example)
            run = phase_joiner(s, admin, tag, mp, expected, profile=args.profile if i == 0 else None)
            run["baseline"] = base
            run["ratio"] = run["events_per_s"] / base["events_per_s"]
            run["consume_produce"] = floor
            run["ratio_to_consume_produce"] = run["events_per_s"] / floor["events_per_s"]
            floor["ratio"] = floor["events_per_s"] / base["events_per_s"]
            runs.append(run)
            print(
                f"max_poll_records={mp}: raw consume {base['events_per_s']:,.0f}/s, consume+produce "
                f"{floor['events_per_s']:,.0f}/s (ratio {floor['ratio']:.2f}), joiner "
                f"{run['events_per_s']:,.0f}/s (ratio {run['ratio']:.2f}), "
                f"{run['redis']['round_trips_per_poll']:.3f} round trips/poll, group join "
                f"{run['group_join_seconds']:.1f}s; examples verified "
                f"({run['counts_final']['examples']})",
                flush=True,
            )
        result["joiner_runs"] = runs

        if args.memory_events:
            t = time.perf_counter()
            result["memory"] = phase_memory(settings, admin, srv, args.memory_events, args.memory_chunk)
            print(f"memory phase: {time.perf_counter() - t:.0f}s", flush=True)
        admin.close()

    result["wall_seconds"] = time.perf_counter() - t_all
    info["loadavg_at_end"] = list(os.getloadavg())
    result["machine"] = info
    print_report(result)
    if args.profile:
        print(f"cProfile of the first joiner run: {args.profile}; top by cumulative time:")
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} (total {result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
