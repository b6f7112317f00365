"""Trainer benchmark: examples/s through consume + decode + learn + checkpoints, against raw kafka-python.

Everything runs in one process against freshly started local servers (Tansu
and Valkey on free ports). The trainer is the real
:class:`stream_learner.learn.trainer.Trainer`, stepped in this process, and
every rate is paired with a raw-consume baseline measured just before or
just after it, because absolute numbers on a shared machine move a lot
between runs while the ratios do not.

Phases:

1. produce   -- N joined examples (``ExampleEvent``, encoded with
                ``stream_learner.events.encode``) to a 1-partition examples
                topic, keyed by request id. 16 float features with their own
                means and scales (1 % of values ``null``), binary classes
                ``"0"``/``"1"`` from a fixed random linear rule on the
                standardized features plus Gaussian noise, 20 % ``unlabeled``,
                ids from ``example_id``, lineage sources set as the joiner
                sets them, a served prediction ``{"0": 1-p, "1": p}``.
2. raw consume -- a group-less ``make_consumer`` consumer (the very fetch
                settings the trainer's consumer gets) assigned to the
                partition, from the beginning, reading the N records without
                decoding. Two baselines per trainer run, measured next to it:
                ``raw`` with ``make_consumer``'s own ``max_poll_records``
                (5000) and ``raw_same_poll`` with the trainer's poll size
                (``10 * trainer_batch_size``).
3. trainer   -- a fresh ``Trainer(settings)`` (fresh state directory, model,
                drift and dead-letter topics, group id; checkpoint every
                10 000 examples, ``trainer_checkpoint_every_s`` 1e9, signing
                key generated into a temporary file) steps until every
                example is applied (``sum(offsets) == N`` and an empty
                buffer). Its clock starts before the first ``step()`` (the
                consumer is built and assigned, like the baseline's) and
                stops when the last *full* chunk is applied: the last
                ``N mod batch_size`` examples form a partial chunk that the
                trainer, by design, trains only after waiting
                ``trainer_max_wait_ms`` once caught up, so it is applied
                untimed. The run then **fails unless** the learner counted
                exactly the produced labeled examples, every unlabeled one as
                pseudo-labeled or skipped, no duplicates, rejections or dead
                letters. Four configurations: logreg and MLP (hidden 64),
                batch 64 and 256, each run with 1 torch intra-op thread and
                with torch's own default (one per core: 2 here)
                (``--torch-threads``), through ``trainer_torch_threads``
                where the trainer has that setting, and with
                ``torch.set_num_threads`` around the run where it has not
                (it then runs with torch's default). The main thread's and
                the whole process's CPU time are recorded too: on a shared
                machine they move less than wall time.
   ``--drift`` adds, for every config, a run built the way the CLI builds
                the trainer: ``Trainer(settings)``, with the River drift
                detectors and policy the settings name (on by default), at
                the trainer's default thread count (``_drift`` runs).
4. in memory -- ``OnlineLearner.process(chunk)`` over the decoded examples in
                chunks of the batch size, no Kafka, no checkpoints (a run
                stops after ``--memory-max-seconds``, 5 s, and is rated
                over the chunks it processed); and
                ``EXAMPLE.decode`` over the N values. This separates the
                learning cost from the Kafka cost.

Each trainer step is split into stages by wrapping the instance's own
methods (instance attributes shadow the bound methods; the product code is
not changed): ``poll``, the session's ``_learn_chunk``, ``learner.process``,
``featurizer.transform`` (featurize), the model's forward pass with
gradients off (predict), ``prequential.score_classes`` (prequential scoring,
the drift detectors' updates and the training targets of the chunk), ``stepper.step`` (the optimizer step, with
``remember_good`` counted apart inside it) and ``checkpoint`` (with its
``state_dict``, ``weights_bytes``, state-store ``save``, the output's ``publish``,
producer ``flush`` and offset ``commit`` parts). ``decode loop`` is
``_learn_chunk`` minus ``process`` (decoding every record, offsets and metrics
bookkeeping). The wrappers cost well under 1 µs per chunk. Garbage
collections are counted and timed by generation (``gc.callbacks``; their
time is also inside the stage that triggered them), and each run records
how busy the machine was: all CPUs' busy share from ``/proc/stat`` and the
share of time some task waited for a CPU from ``/proc/pressure/cpu`` (this
process's own threads included).

``--profile FILE`` runs one more trainer run (``--profile-config``, default
``mlp:64``, with the trainer's default thread count) under cProfile after
the timed repeats and prints the top functions; its rate is not part of the
results.

Time bounds, because torch's default threads can slow the trainer by 10x or
more when the machine is busy: a trainer run that passes
``--run-max-seconds`` (15) stops there and is rated over the examples it
applied (marked ``capped``; its counts are checked for those examples), and
repeats after the first two start only if they are likely to end within
``--max-seconds`` (240) of the first. On an idle machine nothing is capped.

Run::

    .venv/bin/python bench/bench_trainer.py [--examples N] [--repeat R] [--configs mlp:64,logreg:256]
                                            [--torch-threads product,torch,1] [--drift] [--profile FILE]

The median over the repeats is reported for every metric; a ratio is the
median of the per-repeat ratios. Results go to ``bench/results/trainer.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.metadata
import json
import logging
import math
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import torch
from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import NewTopic

import stream_learner.learn.session as session_module
from stream_learner.bus import kafka_options, make_consumer, make_producer
from stream_learner.checkpoint.signing import generate_keypair
from stream_learner.config import Settings
from stream_learner.events import EXAMPLE, ExampleEvent, Source, encode
from stream_learner.join.examples import example_id
from stream_learner.learn.build import build_learner, learner_config
from stream_learner.learn.learner import OnlineLearner
from stream_learner.learn.trainer import Trainer
from stream_learner.local import LocalServers
from stream_learner.logging import configure_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "trainer.json"
N_FEATURES = 16
FEATURES = [f"f{j:02d}" for j in range(N_FEATURES)]
MODEL, MODEL_VERSION = "bench", "3"
SEED = 20240701
T0 = 1_767_225_600_000  # 2026-01-01, event time of the first prediction
UNLABELED_FRACTION = 0.20
MISSING_FRACTION = 0.01
LABEL_NOISE_SD = 0.5  # noise on the logit of the rule, whose signal has sd ~ 2
HIDDEN = 64
CHECKPOINT_EVERY = 10_000
DEFAULT_CONFIGS = "logreg:64,logreg:256,mlp:64,mlp:256"
STEP_TIMEOUT_S = 300.0
WARMUP_EXAMPLES = 5000
MIN_REPEATS = 2
#: What torch chose at start-up (one per core).
TORCH_DEFAULT_THREADS = torch.get_num_threads()
#: Whether the trainer sets torch's thread count from its settings (``trainer_torch_threads``);
#: without that setting it runs with torch's own default.
HAS_THREADS_SETTING = "trainer_torch_threads" in Settings.__struct_fields__
PRODUCT_DEFAULT_THREADS: int = Settings().trainer_torch_threads if HAS_THREADS_SETTING else TORCH_DEFAULT_THREADS


# -- data ---------------------------------------------------------------------


class Workload(msgspec.Struct):
    """N examples as the joiner writes them, pre-encoded, and what they should count as."""

    keys: list[bytes]
    values: list[bytes]
    labeled: int
    unlabeled: int
    positive_rate: float
    rule: dict[str, Any]


def build_workload(n: int, seed: int = SEED) -> Workload:
    """N realistic joined examples: 16 features, a noisy linear rule for the class, 20 % unlabeled."""
    rng = random.Random(seed)
    # Every feature has its own location and scale, as raw business features do;
    # the featurizer has to standardize them.
    means = [rng.uniform(-100.0, 100.0) for _ in FEATURES]
    scales = [10 ** rng.uniform(-1.0, 3.0) for _ in FEATURES]
    weights = [rng.gauss(0.0, 0.5) for _ in FEATURES]
    bias = rng.gauss(0.0, 0.3)
    keys, values = [], []
    labeled = positives = 0
    for i in range(n):
        z = [rng.gauss(0.0, 1.0) for _ in FEATURES]
        features: dict[str, float | None] = {
            name: (None if rng.random() < MISSING_FRACTION else means[j] + scales[j] * z[j])
            for j, name in enumerate(FEATURES)
        }
        signal = bias + sum(w * v for w, v in zip(weights, z))
        y = "1" if signal + rng.gauss(0.0, LABEL_NOISE_SD) > 0 else "0"
        served = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, 0.7 * signal + rng.gauss(0.0, 0.7)))))
        unlabeled = rng.random() < UNLABELED_FRACTION
        kind = "unlabeled" if unlabeled else "labeled"
        pid = f"{rng.getrandbits(128):032x}"
        lid = None if unlabeled else f"{rng.getrandbits(128):032x}"
        rid = f"req-{seed:x}-{i:08d}"
        t_pred = T0 + i
        ex = ExampleEvent(
            example_id=example_id(kind, pid, lid),
            kind=kind,
            request_id=rid,
            model=MODEL,
            model_version=MODEL_VERSION,
            features=features,
            prediction={"0": 1.0 - served, "1": served},
            label=None if unlabeled else y,
            prediction_event_id=pid,
            prediction_time=t_pred,
            prediction_source=Source("sl.predictions", i % 3, i // 3),
            label_event_id=lid,
            label_time=None if unlabeled else t_pred + 1 + (i * 7919) % 500,
            label_source=None if unlabeled else Source("sl.labels", (i + 1) % 3, i // 3),
        )
        keys.append(rid.encode())
        values.append(encode(ex))
        if not unlabeled:
            labeled += 1
            positives += y == "1"
    return Workload(
        keys,
        values,
        labeled,
        n - labeled,
        positives / max(labeled, 1),
        {"weights": weights, "bias": bias, "noise_sd": LABEL_NOISE_SD},
    )


# -- Kafka helpers ------------------------------------------------------------


def create_topics(settings: Settings, names: list[str]) -> None:
    admin = KafkaAdminClient(request_timeout_ms=30_000, **kafka_options(settings))
    try:
        admin.create_topics([NewTopic(n, 1, 1) for n in names], timeout_ms=30_000)
    finally:
        admin.close()


def produce(settings: Settings, topic: str, w: Workload) -> float:
    producer = make_producer(settings)
    try:
        t0 = time.perf_counter()
        send = producer.send
        for key, value in zip(w.keys, w.values):
            send(topic, key=key, value=value)
        producer.flush()
        return time.perf_counter() - t0
    finally:
        producer.close()


def phase_raw_consume(settings: Settings, topic: str, n: int, max_records: int | None) -> tuple[float, float]:
    """Wall and main-thread CPU seconds to read N records, not decoded, with make_consumer's fetch settings."""
    consumer = make_consumer(settings, None)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    seen = 0
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        kwargs = {} if max_records is None else {"max_records": max_records}
        c0 = time.thread_time()
        t0 = time.perf_counter()
        while seen < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"raw consume read only {seen}/{n} records of {topic}")
            batch = consumer.poll(timeout_ms=100, **kwargs)
            for records in batch.values():
                seen += len(records)
        t1 = time.perf_counter()
        c1 = time.thread_time()
    finally:
        consumer.close()
    if seen != n:
        raise SystemExit(f"raw consume read {seen} records of {topic}, expected {n}")
    return t1 - t0, c1 - c0


# -- stages -------------------------------------------------------------------


class Stages:
    """Wall time per stage, by wrapping instance methods (the product code is unchanged)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.durations: dict[str, list[float]] = {}
        self.active = True

    def wrap(
        self, obj: Any, attr: str, stage: str, *, when: Callable[[], bool] | None = None, keep: bool = False
    ) -> None:
        inner = getattr(obj, attr)
        seconds, calls, perf = self.seconds, self.calls, time.perf_counter
        seconds.setdefault(stage, 0.0)
        calls.setdefault(stage, 0)
        durations = self.durations.setdefault(stage, []) if keep else None

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.active or (when is not None and not when()):
                return inner(*args, **kwargs)
            start = perf()
            try:
                return inner(*args, **kwargs)
            finally:
                d = perf() - start
                seconds[stage] += d
                calls[stage] += 1
                if durations is not None:
                    durations.append(d)

        setattr(obj, attr, wrapper)

    def wrap_learner(self, learner: OnlineLearner) -> None:
        self.wrap(learner, "process", "process")
        self.wrap(learner.featurizer, "transform", "featurize")
        # The forward pass with gradients off is the prequential prediction;
        # with gradients on it is part of the train step.
        self.wrap(learner.main.model, "forward", "predict", when=lambda: not torch.is_grad_enabled())
        self.wrap(learner.prequential, "score_classes", "evaluate")
        self.wrap(learner.prequential, "score_regression", "evaluate")
        self.wrap(learner.stepper, "step", "train_step")
        self.wrap(learner.main, "remember_good", "remember_good")

    def wrap_trainer(self, trainer: Trainer) -> None:
        self.wrap(trainer.consumer, "poll", "poll")
        session = trainer.session
        self.wrap(session, "_learn_chunk", "train")
        self.wrap(session, "checkpoint", "checkpoint", keep=True)
        self.wrap(trainer.learner, "state_dict", "ckpt_state_dict")
        self.wrap(session_module, "weights_bytes", "ckpt_weights_bytes")
        self.wrap(session.store, "save", "ckpt_store_save")
        self.wrap(session.output, "publish", "ckpt_publish")
        self.wrap(trainer.producer, "flush", "ckpt_flush")
        self.wrap(trainer.consumer, "commit", "ckpt_commit")
        self.wrap(session.sinks.dead_letters, "send", "dead_letters")
        self.wrap_learner(trainer.learner)


class LoadProbe:
    """How busy the machine was over an interval: all CPUs' busy share (``/proc/stat``, every
    process, this one included) and the share of time some task waited for a CPU
    (``/proc/pressure/cpu``, where the kernel has it)."""

    @staticmethod
    def _read() -> tuple[float, float, float | None]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            idle = fields[3] + fields[4]
            busy = sum(fields[:8]) - idle
        except (OSError, ValueError, IndexError):
            busy = idle = 0
        psi = None
        try:
            for line in Path("/proc/pressure/cpu").read_text().splitlines():
                if line.startswith("some "):
                    psi = int(line.rsplit("total=", 1)[1]) / 1e6
        except (OSError, ValueError, IndexError):
            pass
        return float(busy), float(idle), psi

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.start = self._read()

    def result(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.t0
        busy, idle, psi = self._read()
        d_busy, d_idle = busy - self.start[0], idle - self.start[1]
        return {
            "cpu_busy_share": d_busy / (d_busy + d_idle) if d_busy + d_idle > 0 else None,
            "cpu_pressure_some_share": (psi - self.start[2]) / wall
            if psi is not None and self.start[2] is not None and wall > 0
            else None,
            "loadavg_1m": os.getloadavg()[0],
        }


class GcTimer:
    """Count and time the garbage collector's passes by generation, while ``active``.

    Their time is also inside whichever stage triggered them."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.active = False
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            g = info["generation"]
            self.count[g] += 1
            self.seconds[g] += time.perf_counter() - self._start

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def result(self) -> dict[str, Any]:
        return {"count": list(self.count), "seconds": list(self.seconds)}


def learner_breakdown(s: dict[str, float]) -> dict[str, float]:
    """Exclusive seconds of the learner's stages (process minus its parts = the rest)."""
    out = {
        "featurize": s["featurize"],
        "predict": s["predict"],
        "evaluate": s["evaluate"],
        "train_step_excl_remember_good": s["train_step"] - s["remember_good"],
        "remember_good": s["remember_good"],
    }
    out["process_other"] = s["process"] - sum(out.values())
    return out


def trainer_breakdown(s: dict[str, float], wall: float) -> dict[str, float]:
    """Exclusive seconds of every stage of the timed trainer loop; they add up to ``wall``."""
    ck_parts = ("ckpt_state_dict", "ckpt_weights_bytes", "ckpt_store_save", "ckpt_publish", "ckpt_flush", "ckpt_commit")
    out = {"poll": s["poll"], "decode_loop": s["train"] - s["process"]}
    out.update(learner_breakdown(s))
    out.update({k: s[k] for k in ck_parts})
    out["ckpt_other"] = s["checkpoint"] - sum(s[k] for k in ck_parts)
    out["step_other"] = wall - s["poll"] - s["train"] - s["checkpoint"]
    return out


# -- phase 3: the trainer -----------------------------------------------------


def trainer_settings(
    settings: Settings,
    topic: str,
    arch: str,
    batch: int,
    tag: str,
    key: Path,
    state_root: Path,
    threads: int | None = None,
) -> Settings:
    extra: dict[str, Any] = {}
    if threads is not None and HAS_THREADS_SETTING:
        extra["trainer_torch_threads"] = threads  # the trainer sets torch's thread count itself
    return msgspec.structs.replace(
        settings,
        **extra,
        topic_examples=topic,
        topic_models=f"bench.models.{tag}",
        topic_drift=f"bench.drift.{tag}",
        topic_dlq=f"bench.dlq.{tag}",
        trainer_group_id=f"bench-trainer-{tag}",
        trainer_model=MODEL,
        trainer_features=list(FEATURES),
        trainer_classes=["0", "1"],
        trainer_architecture=arch,
        trainer_hidden=[HIDDEN],
        trainer_batch_size=batch,
        trainer_signing_key=str(key),
        trainer_state_dir=str(state_root / tag),
        trainer_checkpoint_every_examples=CHECKPOINT_EVERY,
        trainer_checkpoint_every_s=1e9,
    )


def drift_monitor(s: Settings) -> Any:
    """The drift detectors the trainer builds from the settings."""
    return build_learner(msgspec.structs.replace(s, trainer_drift_enabled=True))[0].drift


def applied(trainer: Trainer) -> int:
    return sum(trainer.offsets.values())


def phase_trainer(
    s: Settings,
    w: Workload,
    profile: cProfile.Profile | None = None,
    max_seconds: float = math.inf,
    drift: bool = False,
) -> dict[str, Any]:
    """Step a fresh trainer through the topic; see the module docstring. A run that passes
    ``max_seconds`` stops there, is rated over the examples it applied, and is marked ``capped``."""
    n = len(w.values)
    batch = s.trainer_batch_size
    full = n - n % batch
    create_topics(s, [s.topic_models, s.topic_drift, s.topic_dlq])
    # Trainer(settings) is what the CLI runs: the drift detectors and policy the settings name.
    trainer = Trainer(msgspec.structs.replace(s, trainer_drift_enabled=drift))
    if drift and trainer.learner.drift is None:
        raise SystemExit("drift detection is off in the settings (trainer_drift_enabled)")
    threads_in_run = torch.get_num_threads()
    stages = Stages()
    stages.wrap_trainer(trainer)
    gct = GcTimer()
    try:
        gc.collect()
        tracked = len(gc.get_objects())
        gc.callbacks.append(gct)
        gct.active = True
        step = trainer.step
        deadline = time.monotonic() + STEP_TIMEOUT_S
        if profile:
            profile.enable()
        probe = LoadProbe()
        p0, c0 = time.process_time(), time.thread_time()
        t0 = time.perf_counter()
        stop = t0 + max_seconds
        capped = False
        while applied(trainer) < full:
            if time.monotonic() > deadline:
                raise SystemExit(f"trainer applied only {applied(trainer)}/{n}: {trainer.learner.counts}")
            step()
            if time.perf_counter() > stop and applied(trainer) < full:
                capped = True
                break
        t1 = time.perf_counter()
        p1, c1 = time.process_time(), time.thread_time()
        load = probe.result()
        gct.active = False
        if profile:
            profile.disable()
        timed = applied(trainer)
        seconds = dict(stages.seconds)
        ckpt_durations = list(stages.durations["checkpoint"])
        # The partial last chunk waits trainer_max_wait_ms by design: applied untimed.
        while not capped and not (applied(trainer) == n and not trainer.buffer):
            if time.monotonic() > deadline:
                raise SystemExit(f"trainer applied only {applied(trainer)}/{n}: {trainer.learner.counts}")
            step()
        t_all = time.perf_counter()
        stages.active = False
    finally:
        if gct in gc.callbacks:
            gc.callbacks.remove(gct)
        trainer.close()
    c = trainer.learner.counts
    dead = stages.calls["dead_letters"]
    problems = []
    if c["labeled"] + c["pseudo"] + c["pseudo_skipped"] != applied(trainer):
        problems.append(
            f"labeled {c['labeled']} + pseudo {c['pseudo']} + skipped {c['pseudo_skipped']} "
            f"!= applied {applied(trainer)}"
        )
    if not capped and c["labeled"] != w.labeled:
        problems.append(f"labeled {c['labeled']} != {w.labeled}")
    if not capped and c["pseudo"] + c["pseudo_skipped"] != w.unlabeled:
        problems.append(f"pseudo {c['pseudo']} + skipped {c['pseudo_skipped']} != unlabeled {w.unlabeled}")
    for k in ("duplicates", "other_model", "rejected", "late"):
        if c[k]:
            problems.append(f"{k}={c[k]}")
    if dead:
        problems.append(f"{dead} dead letters")
    if len(trainer.published) != trainer.version:
        problems.append(f"published {len(trainer.published)} != version {trainer.version}")
    if problems:
        raise SystemExit(f"trainer run {s.trainer_architecture}:{batch} is wrong: {'; '.join(problems)}; {c}")
    wall = t1 - t0
    return {
        "seconds": wall,
        "examples_timed": timed,
        "capped": capped,
        "seconds_incl_tail": None if capped else t_all - t0,
        "cpu_main_thread_s": c1 - c0,
        "cpu_process_s": p1 - p0,
        "torch_threads_in_run": threads_in_run,
        "gc": gct.result(),
        "gc_tracked_objects_at_start": tracked,
        "load": load,
        "checkpoints": len(ckpt_durations),
        "checkpoint_seconds": ckpt_durations,
        "stage_seconds": trainer_breakdown(seconds, wall),
        "stage_calls": dict(stages.calls),
        "counts": dict(c),
        "accuracy": trainer.learner.summary().get("accuracy"),
        "accuracy_rolling": trainer.learner.summary().get("accuracy_rolling"),
        "served_accuracy": trainer.learner.summary().get("served_accuracy"),
        "versions": trainer.version,
    }


# -- phase 4: in memory -------------------------------------------------------


def phase_decode(values: list[bytes]) -> tuple[float, list[ExampleEvent]]:
    """Seconds to decode every value (each result dropped at once, as the trainer's chunks are),
    and the decoded examples (built untimed: keeping them all alive makes the collector work)."""
    dec = EXAMPLE.decode
    gc.collect()
    t0 = time.perf_counter()
    for v in values:
        dec(v)
    seconds = time.perf_counter() - t0
    return seconds, [dec(v) for v in values]


def phase_learner(
    s: Settings, examples: list[ExampleEvent], max_seconds: float = math.inf, drift: bool = False
) -> dict[str, Any]:
    """``process`` over the examples in chunks of the batch size; stops early after ``max_seconds``."""
    learner = OnlineLearner(learner_config(s), drift=drift_monitor(s) if drift else None)
    stages = Stages()
    stages.wrap_learner(learner)
    batch = s.trainer_batch_size
    chunks = [examples[i : i + batch] for i in range(0, len(examples), batch)]
    process, perf = learner.process, time.perf_counter
    done = 0
    gc.collect()
    gct = GcTimer()
    gct.active = True
    with gct:
        p0, c0 = time.process_time(), time.thread_time()
        t0 = perf()
        stop = t0 + max_seconds
        for chunk in chunks:
            process(chunk)
            done += len(chunk)
            if perf() > stop:
                break
        wall = perf() - t0
        p1, c1 = time.process_time(), time.thread_time()
    stage_seconds = learner_breakdown(stages.seconds)
    stage_seconds["loop_other"] = wall - stages.seconds["process"]
    return {
        "seconds": wall,
        "examples": done,
        "cpu_main_thread_s": c1 - c0,
        "cpu_process_s": p1 - p0,
        "gc": gct.result(),
        "stage_seconds": stage_seconds,
        "accuracy": learner.summary().get("accuracy"),
    }


# -- driver -------------------------------------------------------------------


def parse_configs(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        arch, _, batch = item.strip().partition(":")
        if arch not in ("logreg", "mlp") or not batch.isdigit():
            raise SystemExit(f"bad config {item!r}: use logreg:64, mlp:256, ...")
        out.append((arch, int(batch)))
    return out


def parse_threads(text: str) -> list[int]:
    """``product``: what the trainer runs with by default; ``torch``: torch's own default; or a number."""
    out: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        t = {"product": PRODUCT_DEFAULT_THREADS, "torch": TORCH_DEFAULT_THREADS}.get(item)
        if t is None:
            try:
                t = int(item)
            except ValueError:
                raise SystemExit(f"bad torch thread count {item!r}: use product, torch or a number") from None
        if t < 1:
            raise SystemExit(f"bad torch thread count {item!r}")
        out.add(t)
    return sorted(out)


def mean_or_nan(xs: list[float]) -> float:
    return statistics.mean(xs) if xs else math.nan


def cname(arch: str, batch: int) -> str:
    return f"{arch}_b{batch}"


def run_name(arch: str, batch: int, threads: int, drift: bool = False) -> str:
    return f"{cname(arch, batch)}_t{threads}" + ("_drift" if drift else "")


#: One way to run each config: (torch threads, drift detectors on).
Variant = tuple[int, bool]


def one_repeat(
    settings: Settings,
    topic: str,
    w: Workload,
    configs: list[tuple[str, int]],
    variants: list[Variant],
    r: int,
    key: Path,
    state_root: Path,
    memory_max_s: float,
    run_max_s: float,
) -> dict[str, Any]:
    n = len(w.values)
    out: dict[str, Any] = {"baselines": {}, "runs": {}, "memory": {}}
    order = configs if r % 2 == 0 else list(reversed(configs))
    for i, (arch, batch) in enumerate(order):
        base: dict[str, float] = {}

        def raw() -> None:
            gc.collect()
            base["raw_s"], base["raw_cpu_s"] = phase_raw_consume(settings, topic, n, None)
            gc.collect()
            base["raw_same_poll_s"], _ = phase_raw_consume(settings, topic, n, 10 * batch)

        def train(t: int, drift: bool) -> Callable[[], None]:
            def go() -> None:
                tag = f"{run_name(arch, batch, t, drift)}-r{r}-{uuid.uuid4().hex[:6]}"
                s = trainer_settings(settings, topic, arch, batch, tag, key, state_root, threads=t)
                torch.set_num_threads(t)
                try:
                    res = phase_trainer(s, w, max_seconds=run_max_s, drift=drift)
                finally:
                    torch.set_num_threads(TORCH_DEFAULT_THREADS)
                    shutil.rmtree(state_root / tag, ignore_errors=True)
                if res["torch_threads_in_run"] != t:
                    raise SystemExit(f"the trainer ran with {res['torch_threads_in_run']} torch threads, not {t}")
                res["torch_threads"] = t
                out["runs"][run_name(arch, batch, t, drift)] = res

            return go

        # The baselines go before the trainer runs in one config and after them
        # in the next, and the thread settings swap order too, so a trend in
        # machine load does not always favour the same side.
        trains = [train(*v) for v in (variants if (r + i) % 2 == 0 else list(reversed(variants)))]
        steps = [raw, *trains] if (r + i) % 2 == 0 else [*trains, raw]
        for step in steps:
            step()
        out["baselines"][cname(arch, batch)] = base
        for t, drift in variants:
            res = out["runs"][run_name(arch, batch, t, drift)]
            rate = res["examples_timed"] / res["seconds"]
            print(
                f"  {run_name(arch, batch, t, drift):<20} trainer {rate:>8,.0f}/s  raw {n / base['raw_s']:>8,.0f}/s  "
                f"raw@{10 * batch} {n / base['raw_same_poll_s']:>8,.0f}/s  ratio {rate / (n / base['raw_s']):.3f}  "
                f"checkpoints {res['checkpoints']} x {mean_or_nan(res['checkpoint_seconds']) * 1000:.1f} ms  "
                f"acc {res['accuracy']:.3f}  psi {100 * (res['load']['cpu_pressure_some_share'] or math.nan):.0f}%"
                + (f"  CAPPED at {res['examples_timed']} examples" if res["capped"] else ""),
                flush=True,
            )

    # Phase 4: in memory. The decoded examples exist only here: held during
    # the trainer runs, their ~350k GC-tracked objects would make each full
    # collection there cost ~0.3 s, which a real trainer process does not pay.
    # Frozen here, so the learner's collections skip them too.
    gc.collect()
    out["decode_s"], examples = phase_decode(w.values)
    gc.freeze()
    for arch, batch in order:
        s = trainer_settings(settings, topic, arch, batch, "mem", key, state_root)
        for t, drift in variants:
            torch.set_num_threads(t)
            try:
                out["memory"][run_name(arch, batch, t, drift)] = phase_learner(s, examples, memory_max_s, drift)
            finally:
                torch.set_num_threads(TORCH_DEFAULT_THREADS)
    gc.unfreeze()
    del examples
    gc.collect()
    return out


def summarise(
    repeats: list[dict[str, Any]], n: int, configs: list[tuple[str, int]], variants: list[Variant]
) -> dict[str, Any]:
    med = statistics.median
    summary: dict[str, Any] = {
        "decode_in_memory": {
            "examples_per_s": med(n / rep["decode_s"] for rep in repeats),
            "us_per_example": med(rep["decode_s"] / n * 1e6 for rep in repeats),
        },
        "runs": {},
    }
    for arch, batch in configs:
        bases = [rep["baselines"][cname(arch, batch)] for rep in repeats]
        raw = [n / b["raw_s"] for b in bases]
        raw_same = [n / b["raw_same_poll_s"] for b in bases]
        for t, drift in variants:
            name = run_name(arch, batch, t, drift)
            runs = [rep["runs"][name] for rep in repeats]
            mems = [rep["memory"][name] for rep in repeats]
            rates = [run["examples_timed"] / run["seconds"] for run in runs]
            ratios = [a / b for a, b in zip(rates, raw)]
            ratios_same = [a / b for a, b in zip(rates, raw_same)]
            ck_mean = [mean_or_nan(run["checkpoint_seconds"]) for run in runs]
            ck_share = [sum(run["checkpoint_seconds"]) / run["seconds"] for run in runs]
            stage_names = list(runs[0]["stage_seconds"])
            stages_us = {
                k: med(run["stage_seconds"][k] / run["examples_timed"] * 1e6 for run in runs) for k in stage_names
            }
            stage_share = {k: med(run["stage_seconds"][k] / run["seconds"] for run in runs) for k in stage_names}
            mem_rates = [m["examples"] / m["seconds"] for m in mems]
            raw_cpu = [b["raw_cpu_s"] / n * 1e6 for b in bases]
            cpu_main = [run["cpu_main_thread_s"] / run["examples_timed"] * 1e6 for run in runs]
            cpu_proc = [run["cpu_process_s"] / run["examples_timed"] * 1e6 for run in runs]
            mem_stages_us = {
                k: med(m["stage_seconds"][k] / m["examples"] * 1e6 for m in mems) for k in mems[0]["stage_seconds"]
            }
            summary["runs"][name] = {
                "architecture": arch,
                "batch_size": batch,
                "torch_threads": t,
                "drift_detectors": drift,
                "torch_threads_is_product_default": t == PRODUCT_DEFAULT_THREADS,
                "torch_threads_is_torch_default": t == TORCH_DEFAULT_THREADS,
                "trainer_examples_per_s": med(rates),
                "trainer_examples_per_s_all": rates,
                "trainer_us_per_example": med(1e6 / x for x in rates),
                "raw_consume_per_s": med(raw),
                "raw_consume_per_s_all": raw,
                "raw_consume_same_poll_per_s": med(raw_same),
                "raw_consume_same_poll_per_s_all": raw_same,
                "ratio_to_raw": med(ratios),
                "ratio_to_raw_all": ratios,
                "ratio_to_raw_same_poll": med(ratios_same),
                "ratio_to_raw_same_poll_all": ratios_same,
                "target_ratio": 0.5,
                "meets_target": med(ratios) >= 0.5,
                "cpu_main_thread_us_per_example": med(cpu_main),
                "cpu_process_us_per_example": med(cpu_proc),
                "raw_consume_cpu_us_per_example": med(raw_cpu),
                "cpu_ratio_raw_to_trainer_main_thread": med(r_ / c_ for r_, c_ in zip(raw_cpu, cpu_main)),
                "learner_in_memory_cpu_process_us_per_example": med(
                    m["cpu_process_s"] / m["examples"] * 1e6 for m in mems
                ),
                "learner_in_memory_examples": min(m["examples"] for m in mems),
                "checkpoints": med(run["checkpoints"] for run in runs),
                "checkpoint_mean_s": med(ck_mean),
                "checkpoint_mean_s_all": ck_mean,
                "checkpoint_share": med(ck_share),
                "checkpoint_share_all": ck_share,
                "stages_us_per_example": stages_us,
                "stages_share": stage_share,
                "learner_in_memory_per_s": med(mem_rates),
                "learner_in_memory_per_s_all": mem_rates,
                "learner_in_memory_us_per_example": med(1e6 / x for x in mem_rates),
                "learner_in_memory_stages_us_per_example": mem_stages_us,
                "accuracy": med(run["accuracy"] for run in runs),
                "served_accuracy": med(run["served_accuracy"] for run in runs),
                "gc_full_collections": med(run["gc"]["count"][2] for run in runs),
                "gc_tracked_objects_at_start": med(run["gc_tracked_objects_at_start"] for run in runs),
                "gc_full_collection_mean_s": med(
                    run["gc"]["seconds"][2] / max(run["gc"]["count"][2], 1) for run in runs
                ),
                "gc_us_per_example": med(sum(run["gc"]["seconds"]) / run["examples_timed"] * 1e6 for run in runs),
                "gc_share": med(sum(run["gc"]["seconds"]) / run["seconds"] for run in runs),
                "machine_cpu_busy_share": med(run["load"]["cpu_busy_share"] or math.nan for run in runs),
                "machine_cpu_pressure_share": med(run["load"]["cpu_pressure_some_share"] or math.nan for run in runs),
                "capped_runs": sum(run["capped"] for run in runs),
                "examples_timed_min": min(run["examples_timed"] for run in runs),
                "counts": next((run["counts"] for run in runs if not run["capped"]), runs[0]["counts"]),
            }
    return summary


def print_table(summary: dict[str, Any], n: int, repeats: int) -> None:
    print(
        f"\nN={n} examples, median of {repeats} repeats (ratios: median of per-repeat ratios); "
        f"_tK = K torch intra-op threads (the trainer's default: {PRODUCT_DEFAULT_THREADS}, "
        f"torch's own: {TORCH_DEFAULT_THREADS})\n"
    )
    head = (
        f"{'run':<20} {'trainer/s':>9} {'raw/s':>9} {'ratio':>6} {'raw@poll/s':>10} {'ratio':>6} "
        f"{'ckpts':>5} {'ms/ckpt':>7} {'ckpt%':>6} {'gc2':>3} {'gc%':>5} {'cpu µs':>7} {'proc µs':>7} "
        f"{'learner/s':>9} {'acc':>6} {'psi%':>5}"
    )
    print(head)
    print("-" * len(head))
    for name, e in summary["runs"].items():
        mark = f"{name}*{e['capped_runs']}" if e["capped_runs"] else name
        print(
            f"{mark:<20} {e['trainer_examples_per_s']:>9,.0f} {e['raw_consume_per_s']:>9,.0f} "
            f"{e['ratio_to_raw']:>6.3f} {e['raw_consume_same_poll_per_s']:>10,.0f} "
            f"{e['ratio_to_raw_same_poll']:>6.3f} {e['checkpoints']:>5.0f} "
            f"{e['checkpoint_mean_s'] * 1000:>7.1f} {e['checkpoint_share'] * 100:>5.1f}% "
            f"{e['gc_full_collections']:>3.0f} {e['gc_share'] * 100:>4.1f}% "
            f"{e['cpu_main_thread_us_per_example']:>7.1f} {e['cpu_process_us_per_example']:>7.1f} "
            f"{e['learner_in_memory_per_s']:>9,.0f} {e['accuracy']:>6.3f} "
            f"{e['machine_cpu_pressure_share'] * 100:>5.0f}"
        )
    if any(e["capped_runs"] for e in summary["runs"].values()):
        print("\n*K: K of the repeats stopped at --run-max-seconds; rated over the examples applied by then")
    print(
        "\ngc2 = full (generation 2) garbage collections in the timed run, gc% = time in all collections; "
        "psi% = share of the run's time some task waited for a CPU (/proc/pressure/cpu): the machine's load"
    )
    raw_cpu = statistics.median(e["raw_consume_cpu_us_per_example"] for e in summary["runs"].values())
    print(
        f"\ncpu µs = the trainer's main-thread CPU per example, proc µs = the whole process's "
        f"(torch's worker threads too); raw consume's main thread: {raw_cpu:.1f} µs/example"
    )
    d = summary["decode_in_memory"]
    print(f"\nEXAMPLE.decode in memory: {d['examples_per_s']:,.0f}/s ({d['us_per_example']:.2f} µs/example)")
    runs = summary["runs"]
    width = max(len(k) for k in runs) + 2
    for title, key, total in (
        (
            "trainer stages, µs/example (exclusive; they add up to the trainer's µs/example)",
            "stages_us_per_example",
            "trainer_us_per_example",
        ),
        (
            "in-memory learner stages, µs/example",
            "learner_in_memory_stages_us_per_example",
            "learner_in_memory_us_per_example",
        ),
    ):
        print(f"\n{title}\n")
        print(f"{'stage':<30}" + "".join(f"{c:>{width}}" for c in runs))
        for k in next(iter(runs.values()))[key]:
            print(f"{k:<30}" + "".join(f"{e[key][k]:>{width}.2f}" for e in runs.values()))
        print(f"{'= total':<30}" + "".join(f"{e[total]:>{width}.2f}" for e in runs.values()))
    print()


def extra_machine_info(state_root: Path) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    fs = None
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(state_root).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{fstype} on {mnt} ({dev})"
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": version("numpy"),
        "state_dir_filesystem": fs,
        "code": code_version(),
    }


def code_version() -> dict[str, Any]:
    """Which product code was measured: the commit, the uncommitted package files, and a digest of them."""
    import hashlib
    import subprocess

    import stream_learner

    pkg = Path(stream_learner.__file__).resolve().parent
    repo = pkg.parent
    out: dict[str, Any] = {}
    try:
        out["commit"] = (
            subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "stream_learner"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        out["uncommitted"] = sorted(line[3:] for line in status.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".lua"):
            digest.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    out["package_sha256"] = digest.hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=240.0,
        help="start no repeat beyond the first two that would end the repeats after this "
        "many seconds (a loaded machine slows torch's default threads a lot)",
    )
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"architecture:batch,... (default {DEFAULT_CONFIGS})")
    ap.add_argument(
        "--torch-threads",
        default="product,torch,1",
        help="torch intra-op thread counts to run every config with: 'product' (the trainer's "
        "default), 'torch' (torch's own default, one per core) or numbers (default: "
        "product,torch,1; duplicates run once)",
    )
    ap.add_argument(
        "--drift",
        action="store_true",
        help="also run every config as the CLI does: Trainer(settings), with the drift "
        "detectors and policy on (the trainer's default thread count)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the trainer state stores go (default: a temporary directory)",
    )
    ap.add_argument(
        "--run-max-seconds",
        type=float,
        default=15.0,
        help="stop a trainer run after this long and rate the examples it applied (marked capped)",
    )
    ap.add_argument(
        "--memory-max-seconds",
        type=float,
        default=5.0,
        help="stop an in-memory learner run after this long and rate the chunks it processed",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="after the repeats, run one more trainer under cProfile and dump the stats here",
    )
    ap.add_argument(
        "--profile-config",
        default="mlp:64",
        help="architecture:batch of the profiled run (with the trainer's default thread count)",
    )
    ap.add_argument("--kafka-log-level", default="ERROR")
    args = ap.parse_args(argv)
    configure_logging("error")  # the drift runs log every drift finding as a warning
    logging.getLogger("kafka").setLevel(args.kafka_log_level.upper())
    configs = parse_configs(args.configs)
    threads = parse_threads(args.torch_threads)
    variants: list[Variant] = [(t, False) for t in threads] + ([(PRODUCT_DEFAULT_THREADS, True)] if args.drift else [])
    n = args.examples

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    state_root = args.state_dir or work / "state"
    state_root.mkdir(parents=True, exist_ok=True)
    private_pem, _ = generate_keypair()
    key = work / "signing.pem"
    key.write_bytes(private_pem)
    key.chmod(0o600)

    info = machine_info()
    info.update(extra_machine_info(state_root))
    t_build = time.perf_counter()
    w = build_workload(n)
    sizes = [len(v) for v in w.values]
    print(
        f"built {n} examples in {time.perf_counter() - t_build:.1f}s: {w.labeled} labeled, {w.unlabeled} "
        f'unlabeled, {w.positive_rate:.1%} of labels are "1", mean value size {statistics.mean(sizes):.0f} bytes'
    )
    _, warmup_examples = phase_decode(w.values[:WARMUP_EXAMPLES])

    repeats: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    try:
        with LocalServers(Settings()) as srv:
            settings = srv.settings
            topic = f"bench.examples.{uuid.uuid4().hex[:6]}"
            create_topics(settings, [topic])
            produce_s = produce(settings, topic, w)
            print(f"produced {n} examples to {topic} in {produce_s:.1f}s ({n / produce_s:,.0f}/s)")
            # Warm-up, untimed: torch's first forward/backward/optimizer steps and
            # the broker's first fetches of the topic.
            phase_raw_consume(settings, topic, n, None)
            for arch, batch in configs:
                s = trainer_settings(settings, topic, arch, batch, "warmup", key, state_root)
                for t, drift in variants:
                    torch.set_num_threads(t)
                    phase_learner(s, warmup_examples, drift=drift)
                torch.set_num_threads(TORCH_DEFAULT_THREADS)
            del warmup_examples
            t_repeats = time.perf_counter()
            longest = 0.0
            for r in range(args.repeat):
                elapsed = time.perf_counter() - t_repeats
                if r >= MIN_REPEATS and elapsed + longest > args.max_seconds:
                    print(
                        f"stopping after {r} repeats: another would pass --max-seconds {args.max_seconds:.0f} "
                        f"({elapsed:.0f}s so far, the longest repeat took {longest:.0f}s)"
                    )
                    break
                t_rep = time.perf_counter()
                print(f"repeat {r + 1}/{args.repeat}", flush=True)
                repeats.append(
                    one_repeat(
                        settings,
                        topic,
                        w,
                        configs,
                        variants,
                        r,
                        key,
                        state_root,
                        args.memory_max_seconds,
                        args.run_max_seconds,
                    )
                )
                longest = max(longest, time.perf_counter() - t_rep)
                print(f"repeat {r + 1}/{args.repeat} done in {time.perf_counter() - t_rep:.1f}s", flush=True)
            wall = time.perf_counter() - t_all
            profile_result = None
            if args.profile:
                arch, batch = parse_configs(args.profile_config)[0]
                t = PRODUCT_DEFAULT_THREADS
                s = trainer_settings(
                    settings, topic, arch, batch, f"profile-{uuid.uuid4().hex[:6]}", key, state_root, threads=t
                )
                prof = cProfile.Profile()
                torch.set_num_threads(t)
                res = phase_trainer(s, w, profile=prof)
                torch.set_num_threads(TORCH_DEFAULT_THREADS)
                prof.dump_stats(str(args.profile))
                profile_result = {
                    "config": run_name(arch, batch, t),
                    "file": str(args.profile),
                    "examples_per_s_under_cprofile": res["examples_timed"] / res["seconds"],
                }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = summarise(repeats, n, configs, variants)
    print_table(summary, n, len(repeats))
    info["loadavg_at_end"] = list(os.getloadavg())
    result = {
        "benchmark": "trainer",
        "examples": n,
        "repeats": len(repeats),
        "repeats_asked": args.repeat,
        "partitions": 1,
        "features": N_FEATURES,
        "hidden": HIDDEN,
        "checkpoint_every_examples": CHECKPOINT_EVERY,
        "torch_threads": threads,
        "drift_variant": args.drift,
        "torch_default_threads": TORCH_DEFAULT_THREADS,
        "trainer_default_threads": PRODUCT_DEFAULT_THREADS,
        "trainer_sets_threads": HAS_THREADS_SETTING,
        "labeled": w.labeled,
        "unlabeled": w.unlabeled,
        "positive_rate": w.positive_rate,
        "missing_fraction": MISSING_FRACTION,
        "mean_value_bytes": statistics.mean(sizes),
        "produce_seconds": produce_s,
        "wall_seconds": wall,
        "machine": info,
        "summary": summary,
        "raw": repeats,
    }
    if profile_result:
        result["profile"] = profile_result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.profile:
        print(
            f"cProfile of one {profile_result['config']} trainer run: {args.profile} "
            f"({profile_result['examples_per_s_under_cprofile']:,.0f}/s under the profiler); top by tottime:"
        )
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
