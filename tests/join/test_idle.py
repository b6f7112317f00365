"""Idleness against a real ``stream-learner joiner`` process: records flowing are never idle, an outage expires nothing.

Both tests write with librdkafka, as an application would, to every input
partition, and check the README's idle rules: a partition is idle only when
it is caught up *and* has had no record for ``joiner_idle_timeout_ms``; one
that nobody has watched (its joiner was down) is active, so a joiner that
comes back reads the labels that waited before any window closes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from stream_learner.config import Settings
from stream_learner.events import now_ms

from ..procs import settings_env
from .helpers import read_examples, wait_until

PARTITIONS = 3


def joiner_settings(settings: Settings, **kw: object) -> Settings:
    return msgspec.structs.replace(
        settings,
        joiner_idle_advance=True,
        joiner_idle_timeout_ms=3_000,
        log_format="json",
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        joiner_group_id=f"{settings.topic_predictions}-idle",
        joiner_redis_prefix="{" + settings.topic_predictions + "}:",
        **kw,
    )


class App:
    """An application writing predictions and labels with librdkafka, to the partitions it is told."""

    def __init__(self, settings: Settings) -> None:
        confluent_kafka = pytest.importorskip("confluent_kafka")
        self.settings = settings
        self.producer = confluent_kafka.Producer(
            {"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True, "linger.ms": 1}
        )

    def prediction(self, req: str, t: int, partition: int) -> None:
        value = {
            "event_id": f"p-{req}",
            "request_id": req,
            "model": "m",
            "model_version": "1",
            "event_time": t,
            "features": {"x": 1.0},
            "prediction": {"a": 0.6, "b": 0.4},
        }
        self.producer.produce(self.settings.topic_predictions, key=req, value=json.dumps(value), partition=partition)
        self.producer.poll(0)

    def label(self, req: str, t: int, partition: int) -> None:
        value = {"event_id": f"l-{req}", "request_id": req, "event_time": t, "label": "a"}
        self.producer.produce(self.settings.topic_labels, key=req, value=json.dumps(value), partition=partition)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def start_joiner(settings: Settings, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "joiner"], env=settings_env(settings), stderr=log.open("a")
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.slow
def test_a_steady_trickle_an_hour_late_gives_every_pair_labeled(settings: Settings, tmp_path: Path) -> None:
    # Event times an hour behind the wall clock (a delayed producer, a backfill through the live topics),
    # a record on every partition every 100 ms, each label 500 ms of event time after its prediction.
    s = joiner_settings(
        settings, joiner_window_ms=10_000, joiner_late_retention_ms=600_000, joiner_orphan_retention_ms=600_000
    )
    app = App(s)
    proc = start_joiner(s, tmp_path / "joiner.log")
    lag = 3_600_000
    sent: list[tuple[str, int, int]] = []
    try:
        began = time.monotonic()
        k = 0
        while time.monotonic() - began < 15:  # five idle timeouts
            t = now_ms() - lag
            for p in range(PARTITIONS):
                req = f"r-{k}-{p}"
                app.prediction(req, t, p)
                sent.append((req, t, p))
            for req, pt, p in sent[-5 * PARTITIONS - PARTITIONS : -5 * PARTITIONS]:
                app.label(req, pt + 500, p)  # the label of the prediction sent 500 ms ago
            k += 1
            time.sleep(0.1)
        for req, pt, p in sent[-5 * PARTITIONS :]:
            app.label(req, pt + 500, p)
        app.flush()
        examples = read_examples(s, expect=len(sent), timeout_s=60)
        alive = proc.poll() is None
    finally:
        stop(proc)
    tail = (tmp_path / "joiner.log").read_text()[-2000:]
    assert alive, tail
    kinds = Counter(x.kind for x in examples)
    assert kinds == {"labeled": len(sent)}, (kinds, tail)


@pytest.mark.slow
def test_a_joiner_down_longer_than_the_idle_timeout_loses_no_label(settings: Settings, tmp_path: Path) -> None:
    # Window 5 s and orphan retention 4 s of event time, idle timeout 3 s, the joiner down 12 s: under a
    # wall-clock watermark every window would close and every early label would be dropped as an orphan.
    s = joiner_settings(
        settings, joiner_window_ms=5_000, joiner_late_retention_ms=600_000, joiner_orphan_retention_ms=4_000
    )
    app = App(s)
    log = tmp_path / "joiner.log"
    proc = start_joiner(s, log)
    pairs: dict[str, str] = {}  # request -> kind expected
    try:
        t = now_ms()
        for p in range(PARTITIONS):  # a first pair per partition: the joiner is up and reading
            app.prediction(f"w-{p}", t, p)
            app.label(f"w-{p}", t + 1, p)
            pairs[f"w-{p}"] = "labeled"
        app.flush()
        read_examples(s, expect=PARTITIONS, timeout_s=90)
        # Predictions the joiner reads; their labels come while it is down.
        before = []
        for i in range(60):
            req = f"a-{i}"
            before.append((req, now_ms(), i % PARTITIONS))
            app.prediction(req, before[-1][1], i % PARTITIONS)
            time.sleep(0.02)
        app.flush()
        time.sleep(1.5)  # read (caught up), not yet idle
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        down = time.monotonic()
        for req, pt, p in before:
            app.label(req, pt + 1_000, (p + 1) % PARTITIONS)  # within the window, on another partition
            pairs[req] = "labeled"
        # While it is down: more pairs, half of them with the label written first; some never labeled.
        for i in range(60):
            req, pt = f"b-{i}", now_ms()
            if i % 10 == 9:
                app.prediction(req, pt, i % PARTITIONS)
                pairs[req] = "unlabeled"
            elif i % 2:
                app.label(req, pt + 200, (i + 1) % PARTITIONS)
                app.prediction(req, pt, i % PARTITIONS)
                pairs[req] = "labeled"
            else:
                app.prediction(req, pt, i % PARTITIONS)
                app.label(req, pt + 200, (i + 1) % PARTITIONS)
                pairs[req] = "labeled"
            time.sleep(0.1)
        app.flush()
        time.sleep(max(0.0, 12 - (time.monotonic() - down)))
        proc = start_joiner(s, log)
        # The never-labeled ones close by idle advance once traffic stops: wait for them too.
        examples = read_examples(s, expect=len(pairs), timeout_s=120)
        wait_until(lambda: proc.poll() is None, timeout_s=1, what="the joiner to be alive")
    finally:
        stop(proc)
    tail = log.read_text()[-3000:]
    got = {(x.request_id, x.kind) for x in examples}
    assert got == set(pairs.items()), (sorted(got - set(pairs.items()))[:10], tail)
    stopped = [json.loads(line) for line in log.read_text().splitlines() if '"joiner_stopped"' in line]
    assert stopped and stopped[-1]["counts"]["orphans_dropped"] == 0
