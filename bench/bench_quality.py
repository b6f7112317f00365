"""Quality benchmark: our online learner against River and MOA, side by side, on drifting and real streams.

The default phase is ``targets`` (issue 14): on each of seven streams
(``agrawal`` and ``led`` with an abrupt drift, ``sea``, ``shuttle``,
``hyperplane`` with gradual drift, ``rbfdrift``, ``mixed`` with two abrupt
drifts) River's LogisticRegression (one-vs-rest beyond two classes),
HoeffdingAdaptiveTree and ARF, MOA's HoeffdingAdaptiveTree and
AdaptiveRandomForest through CapyMOA (skipped when it is not installed; a
bench/dev extra), and our default MLP: accuracy, examples/s, the accuracy
in the first 5k after each abrupt drift, the spike guard's refusals outside
drifts; then ours at 10 % labels with pseudo-labels on and off. It ends with
the targets table: each target met, or by how much it is missed. The
earlier phases (``main``, ``missing``, ``threads``, ``ablation``, on
``--streams``) are described below and run with ``--phases``.

Everything runs in one process, in memory (no Kafka, no Redis): the learner
is the real :class:`stream_learner.learn.learner.OnlineLearner`, fed chunks
of ``batch_size`` :class:`~stream_learner.events.ExampleEvent` exactly as the
trainer feeds it, and the drift policy's actions are applied after each
chunk the way ``Trainer._on_drift`` applies them (checkpoint and alert
actions are counted, there is nothing to publish). River's models run
prequentially: ``predict_one`` then ``learn_one``, one example at a time.

Streams (seeded; River's bundled generators and data only, nothing is
downloaded):

a. ``agrawal``  -- ``ConceptDriftStream(Agrawal(0, seed), Agrawal(2, seed+1),
                   position=P, width=max(P // 100, 1))``: an abrupt drift at P.
                   Function 2 agrees with function 0 on 46 % of the examples
                   and is balanced (53 % positive), so no majority-class
                   fallback can fake a recovery.
b. ``sea``      -- ``ConceptDriftStream(SEA(0, seed), SEA(3, seed+1), ...)``:
                   the threshold on x1 + x2 moves from 8 to 9.5 (13 % of the
                   labels flip).
c. ``shuttle``  -- River's bundled Statlog Shuttle. River 0.26 ships it as the
                   ODDS *binary* anomaly version (49 097 rows, 7 % anomalies),
                   not the 7-class original; the class list is collected from
                   the data before learning and mapped to strings.

Models, each on the same stream:

* ours  -- ``OnlineLearner`` (MLP and logistic regression) configured from
           the product defaults (``learner_config(Settings(...))``), with the
           default drift detectors and policy (``stream_learner.drift.from_settings``) ON,
           and with drift detection OFF; and the bench's ``tuned``
           configuration (:data:`TUNED`, the findings in bench/README.md);
* River -- ``StandardScaler() | LogisticRegression()`` (all three streams
           are binary, so no one-vs-rest) and
           ``HoeffdingAdaptiveTreeClassifier``;
* majority -- the running majority class, for scale.

Phases:

1. main     -- every model on every stream, ``--repeat`` times, round-robin;
               accuracy must be identical in every repeat (all seeded, torch
               on one thread), the fastest repeat gives the examples/s.
               Reported: prequential accuracy (cumulative, over examples
               whose label exists); examples/s of the learning loop only (the
               conversion into events happens before the clock starts); our
               examples/s divided by that of River's best model (the more
               accurate of the two on that stream). On the drifting streams:
               the rolling accuracy (window ``WINDOW``) just before the
               drift, its minimum after, and the **recovery**: the number of
               examples after P until the rolling accuracy, over a window
               that holds only post-drift examples, is back at 95 % of the
               pre-drift level (never less than the window); the first drift
               our detectors report once the transition has begun; the
               number of drift findings; the batches the loss-spike guard
               rolled back.
2. missing  -- 50 % of the examples become ``unlabeled`` (label ``None``);
               River predicts them but learns only the labeled ones; our MLP
               runs with and without pseudo-label steps. Accuracy on the
               labeled examples (what the learner itself scores), on every
               example against its hidden true label, and on the unlabeled
               ones; recovery against the true labels.
3. threads  -- our default MLP with torch's intra-op threads at 1 and 2, on
               a quiet machine and next to one CPU-bound process that the
               bench starts and stops (``--threads-examples``, 0 skips it).
4. ablation -- the tuned MLP with one setting changed at a time.
5. sweep    -- (``--sweep`` only) learning rate x batch size x width around
               the tuned MLP.

Run::

    .venv/bin/python bench/bench_quality.py [--examples N] [--drift-at P] [--seed S] [--repeat R]
    .venv/bin/python bench/bench_quality.py --phases main,missing,threads,ablation [--sweep]

The targets phase writes ``bench/results/quality_targets.json``, the others
``bench/results/quality.json``; MOA's and River's forests take most of its time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from river import datasets, forest, linear_model, multiclass, preprocessing, tree
from river.datasets import synth

from stream_learner.config import Settings
from stream_learner.drift import DriftPolicy, from_settings
from stream_learner.events import ExampleEvent
from stream_learner.join.examples import example_id
from stream_learner.learn.build import learner_config
from stream_learner.learn.learner import LearnerConfig, OnlineLearner
from stream_learner.learn.session import apply_drift_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"
RESULTS_TARGETS = RESULTS.with_name("quality_targets.json")
MODEL = "bench"
SEED = 20240801
WINDOW = 500  # rolling accuracy window for the recovery measure
RECOVERY_LEVEL = 0.95
UNLABELED_FRACTION = 0.5


# -- streams ------------------------------------------------------------------


@dataclasses.dataclass
class Stream:
    name: str
    description: str
    features: list[str]
    classes: list[str]  # our class names, in output order
    xs: list[dict[str, float]]
    ys: list[Any]  # River's native labels
    drift_at: int | None
    abrupt: list[int] = dataclasses.field(default_factory=list)  # every abrupt drift's position

    @property
    def labels(self) -> list[str]:
        return [str(y) for y in self.ys]


def make_stream(name: str, n: int, at: int, seed: int) -> Stream:
    if name == "agrawal":
        width = max(at // 100, 1)
        gen = synth.ConceptDriftStream(
            synth.Agrawal(classification_function=0, seed=seed),
            synth.Agrawal(classification_function=2, seed=seed + 1),
            position=at,
            width=width,
            seed=seed,
        )
        desc = f"Agrawal f0 -> f2 at {at} (width {width})"
        data = list(gen.take(n))
        drift_at: int | None = at
    elif name == "sea":
        width = max(at // 100, 1)
        gen = synth.ConceptDriftStream(
            synth.SEA(variant=0, seed=seed), synth.SEA(variant=3, seed=seed + 1), position=at, width=width, seed=seed
        )
        desc = f"SEA variant 0 -> 3 at {at} (width {width})"
        data = list(gen.take(n))
        drift_at = at
    elif name == "shuttle":
        data = list(datasets.Shuttle())[:n]
        desc = f"Shuttle (River's bundled ODDS binary version), {len(data)} rows, no synthetic drift"
        drift_at = None
    elif name == "hyperplane":
        # Gradual drift: the hyperplane's weights move a little at every example.
        gen = synth.Hyperplane(seed=seed, n_features=10, n_drift_features=5, mag_change=0.001, noise_percentage=0.05)
        desc = "Hyperplane, 10 features, 5 drifting (mag_change 0.001: gradual drift), 5 % noise"
        data = list(gen.take(n))
        drift_at = None
    elif name == "rbfdrift":
        gen = synth.RandomRBFDrift(
            seed_model=seed, seed_sample=seed + 1, n_classes=4, n_features=10, n_centroids=50, change_speed=0.0001
        )
        desc = "RandomRBFDrift, 4 classes, 10 features, 50 centroids all moving (speed 0.0001)"
        data = list(gen.take(n))
        drift_at = None
    elif name == "led":
        width = max(at // 100, 1)
        gen = synth.ConceptDriftStream(
            synth.LED(seed=seed, noise_percentage=0.1, irrelevant_features=True),
            synth.LEDDrift(seed=seed + 1, noise_percentage=0.1, irrelevant_features=True, n_drift_features=7),
            position=at,
            width=width,
            seed=seed,
        )
        desc = (
            f"LED (10 digits, 24 binary features, 10 % noise) -> LEDDrift (7 features swapped) at {at} (width {width})"
        )
        data = list(gen.take(n))
        drift_at = at
    elif name == "mixed":
        # Two abrupt drifts: function 0 -> 1 at n/3, back to 0 at 2n/3.
        first, second = n // 3, 2 * n // 3
        width = max(first // 100, 1)
        gen = synth.ConceptDriftStream(
            synth.Mixed(classification_function=0, seed=seed),
            synth.ConceptDriftStream(
                synth.Mixed(classification_function=1, seed=seed + 1),
                synth.Mixed(classification_function=0, seed=seed + 2),
                position=second - first,
                width=width,
                seed=seed + 3,
            ),
            position=first,
            width=width,
            seed=seed,
        )
        desc = f"Mixed f0 -> f1 at {first}, -> f0 at {second} (width {width})"
        data = list(gen.take(n))
        drift_at = first
        abrupt = [first, second]
    else:
        raise ValueError(f"unknown stream {name!r}")
    if name != "mixed":
        abrupt = [drift_at] if drift_at is not None else []
    # Feature names are strings (River's generators number some features).
    xs = [{(k if isinstance(k, str) else f"x{k}"): float(v) for k, v in x.items()} for x, _ in data]
    ys = [y for _, y in data]  # River's own labels (Agrawal and Shuttle: int, SEA: bool)
    features = list(xs[0])
    # The learner needs its class list up front: collect it from the data first.
    classes = sorted({str(y) for y in ys})
    return Stream(name, desc, features, classes, xs, ys, drift_at, abrupt)


def to_events(stream: Stream, unlabeled: Sequence[bool] | None = None) -> list[ExampleEvent]:
    """The stream as joined examples (done once, before any clock starts)."""
    k = len(stream.classes)
    served = dict.fromkeys(stream.classes, 1.0 / k)  # a dummy served prediction
    out = []
    for i, (x, y) in enumerate(zip(stream.xs, stream.labels)):
        kind = "unlabeled" if unlabeled is not None and unlabeled[i] else "labeled"
        pid = f"p-{stream.name}-{i}"
        lid = None if kind == "unlabeled" else f"l-{stream.name}-{i}"
        out.append(
            ExampleEvent(
                example_id=example_id(kind, pid, lid),
                kind=kind,
                request_id=f"r-{stream.name}-{i}",
                model=MODEL,
                model_version="1",
                features=x,
                prediction=served,
                label=None if lid is None else y,
                prediction_event_id=pid,
                prediction_time=i,
                label_event_id=lid,
                label_time=None if lid is None else i + 1,
            )
        )
    return out


# -- our learner --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ours:
    """One configuration of our learner: a base (the product defaults, or TUNED) and what differs."""

    architecture: str = "mlp"
    drift: bool = True
    base: str = "default"  # "default" or "tuned"
    hidden: tuple[int, ...] | None = None
    lr: float | None = None
    batch_size: int | None = None
    spike_factor: float | None = None
    optimizer: str | None = None
    pseudo: bool | None = None
    on_drift: tuple[str, ...] | None = None
    lr_boost_factor: float | None = None
    lr_boost_batches: int | None = None
    changed: tuple[str, ...] = ()  # the fields set on top of the base, for the label

    def label(self) -> str:
        parts = [f"{self.architecture} {'drift' if self.drift else 'no-drift'} {self.base}"]
        for k in self.changed:
            v = getattr(self, k)
            if k == "spike_factor":
                v = "off" if v >= 1e9 else v
            elif k == "on_drift":
                v = "+".join(a for a in v if a not in ("promote_challenger_if_better", "checkpoint"))
            elif k == "pseudo":
                v = "on" if v else "off"
            elif isinstance(v, tuple):
                v = list(v)
            parts.append(f"{k}={v}")
        return " ".join(parts)


# What the bench calls "tuned": the product defaults except where the
# findings in bench/README.md say otherwise: the loss-spike guard off (it
# refuses every batch after an abrupt drift), learning rate 0.01 instead of
# 0.005, batches of 32 instead of 64, and on a drift an optimizer reset plus a
# 3x learning-rate boost for 100 batches (instead of a 2x boost).
TUNED: dict[str, Any] = dict(
    lr=0.01,
    batch_size=32,
    spike_factor=1e9,
    on_drift=("promote_challenger_if_better", "optimizer_reset", "lr_boost", "checkpoint"),
    lr_boost_factor=3.0,
    lr_boost_batches=100,
)


def default(architecture: str = "mlp", *, drift: bool = True, **changes: Any) -> Ours:
    return Ours(architecture, drift, "default", **changes, changed=tuple(changes))


def tuned(architecture: str = "mlp", *, drift: bool = True, **changes: Any) -> Ours:
    return Ours(architecture, drift, "tuned", **{**TUNED, **changes}, changed=tuple(changes))


def settings_for(stream: Stream, o: Ours) -> Settings:
    kw: dict[str, Any] = dict(
        trainer_model=MODEL,
        trainer_task="binary" if len(stream.classes) == 2 else "multiclass",
        trainer_classes=stream.classes,
        trainer_features=stream.features,
        trainer_architecture=o.architecture,
        trainer_drift_enabled=o.drift,
    )
    for field, key in (
        ("hidden", "trainer_hidden"),
        ("lr", "trainer_lr"),
        ("batch_size", "trainer_batch_size"),
        ("optimizer", "trainer_optimizer"),
        ("pseudo", "trainer_pseudo_enabled"),
        ("on_drift", "trainer_drift_on_drift"),
        ("lr_boost_factor", "trainer_drift_lr_boost_factor"),
        ("lr_boost_batches", "trainer_drift_lr_boost_batches"),
    ):
        v = getattr(o, field)
        if v is not None:
            kw[key] = list(v) if isinstance(v, tuple) else v
    return Settings(**kw)


def build_ours(stream: Stream, o: Ours) -> tuple[OnlineLearner, DriftPolicy, int, LearnerConfig]:
    settings = settings_for(stream, o)
    config = learner_config(settings)
    if o.spike_factor is not None:
        # Settings refuse a disabled guard (> 1 required, any finite value); the config takes any number.
        config = dataclasses.replace(config, spike_factor=o.spike_factor)
    monitor, policy = from_settings(settings)
    return OnlineLearner(config, drift=monitor), policy, settings.trainer_batch_size, config


def apply_policy(learner: OnlineLearner, policy: DriftPolicy, finding: Any, log: dict[str, Any]) -> None:
    """What the trainer does with a finding (``apply_drift_policy``), minus Kafka; the findings are logged."""
    champion = learner.main
    actions = apply_drift_policy(learner, policy, finding)
    log["promoted"] += int(learner.main is not champion)  # a promotion replaces the main model
    log["findings"].append([finding.detector, finding.kind.value, finding.index, [a.kind for a in actions]])


def run_ours(stream: Stream, events: list[ExampleEvent], o: Ours) -> dict[str, Any]:
    learner, policy, batch, config = build_ours(stream, o)
    preds: list[list[int]] = []
    # Capture the prequential predictions (argmax of the logits the learner
    # scores with) by shadowing one bound method on the instance; product code
    # is unchanged and the capture costs one argmax per chunk.
    original = learner.prequential.score_classes

    def capture(rows: Any, predictor: Any, out: torch.Tensor, *rest: Any) -> Any:
        preds.append(out.argmax(dim=1).tolist())
        return original(rows, predictor, out, *rest)

    learner.prequential.score_classes = capture  # type: ignore[method-assign]
    chunks = [events[i : i + batch] for i in range(0, len(events), batch)]
    log: dict[str, Any] = {"findings": [], "promoted": 0}
    gc.collect()
    t0 = time.perf_counter()
    counts = learner.counts
    rollback_at: list[int] = []  # the first example of every batch the spike guard refused
    for c, chunk in enumerate(chunks):
        before = counts["rollbacks"]
        result = learner.process(chunk)
        if counts["rollbacks"] != before:
            rollback_at.append(c * batch)
        for finding in result.findings:
            apply_policy(learner, policy, finding, log)
        counts = learner.counts  # a promotion and a load keep the counts dict (the parts share it)
    seconds = time.perf_counter() - t0
    flat = [p for chunk_preds in preds for p in chunk_preds]
    assert len(flat) == len(events), (len(flat), len(events))
    summary = learner.summary()
    drifts = [f for f in log["findings"] if f[1] == "drift"]
    return {
        "model": f"ours {o.label()}",
        "family": "ours",
        "config": {
            "architecture": o.architecture,
            "drift": o.drift,
            "batch_size": batch,
            "hidden": list(config.spec.hidden),
            "lr": config.lr,
            "optimizer": config.optimizer,
            "spike_factor": config.spike_factor,
            "clip_norm": config.clip_norm,
            "pseudo_enabled": config.pseudo_enabled,
            "pseudo_threshold": config.pseudo_threshold,
            "pseudo_weight": config.pseudo_weight,
            "policy": {
                "on_drift": list(policy.on_drift),
                "lr_boost_factor": policy.lr_boost_factor,
                "lr_boost_batches": policy.lr_boost_steps,
            }
            if o.drift
            else None,
        },
        "pred_index": flat,
        "seconds": seconds,
        "learner_accuracy": summary.get("accuracy"),
        "counts": dict(learner.counts),
        "rollback_at": rollback_at,
        "drift_findings": len(log["findings"]),
        "drifts": [[f[0], f[2]] for f in drifts],
        "promoted": log["promoted"],
    }


# -- River ----------------------------------------------------------------------


RIVER_MODELS: dict[str, Callable[[int], Any]] = {
    "river LogReg+scaler": lambda seed: preprocessing.StandardScaler() | linear_model.LogisticRegression(),
    "river HAT": lambda seed: tree.HoeffdingAdaptiveTreeClassifier(seed=seed),
}
#: The targets phase also runs River's adaptive random forest (10 trees, its defaults) and, for
#: more than two classes, one-vs-rest logistic regression (River's LogisticRegression is binary).
RIVER_TARGET_MODELS: dict[str, Callable[[int, int], Any]] = {
    "river LogReg+scaler": lambda seed, k: (
        preprocessing.StandardScaler()
        | (
            linear_model.LogisticRegression()
            if k == 2
            else multiclass.OneVsRestClassifier(linear_model.LogisticRegression())
        )
    ),
    "river HAT": lambda seed, k: tree.HoeffdingAdaptiveTreeClassifier(seed=seed),
    "river ARF": lambda seed, k: forest.ARFClassifier(seed=seed),
}
MOA_MODELS = ("moa HAT", "moa ARF")


def run_river(name: str, stream: Stream, seed: int, learn_mask: Sequence[bool] | None = None) -> dict[str, Any]:
    model = RIVER_MODELS[name](seed) if name in RIVER_MODELS else RIVER_TARGET_MODELS[name](seed, len(stream.classes))
    xs, ys = stream.xs, stream.ys
    preds: list[Any] = []
    append, predict, learn = preds.append, model.predict_one, model.learn_one
    gc.collect()
    t0 = time.perf_counter()
    if learn_mask is None:
        for x, y in zip(xs, ys):
            append(predict(x))
            learn(x, y)
    else:
        for x, y, m in zip(xs, ys, learn_mask):
            append(predict(x))
            if m:
                learn(x, y)
    seconds = time.perf_counter() - t0
    return {"model": name, "family": "river", "preds": preds, "seconds": seconds}


def moa_available() -> str | None:
    """CapyMOA's version if it imports and its JVM starts, else None (the MOA models are skipped)."""
    try:
        import capymoa.classifier  # noqa: F401
    except Exception:
        return None
    return importlib.metadata.version("capymoa")


def run_moa(name: str, stream: Stream, seed: int, learn_mask: Sequence[bool] | None = None) -> dict[str, Any]:
    """A MOA model through CapyMOA, prequential, one example at a time (MOA's defaults: ARF with
    100 trees and 60 % of the features per split, HAT with a grace period of 200)."""
    from capymoa.classifier import AdaptiveRandomForestClassifier, HoeffdingAdaptiveTree
    from capymoa.core import LabeledInstance
    from capymoa.stream import Schema

    target = "__class__"
    schema = Schema.from_custom(
        features=[*stream.features, target], target=target, categories={target: stream.classes}, name=stream.name
    )
    if name == "moa ARF":
        model: Any = AdaptiveRandomForestClassifier(schema=schema, random_seed=seed % 2**31)
    elif name == "moa HAT":
        model = HoeffdingAdaptiveTree(schema=schema, random_seed=seed % 2**31)
    else:
        raise ValueError(name)
    index = {c: i for i, c in enumerate(stream.classes)}
    xs = np.array([[x[f] for f in stream.features] for x in stream.xs], dtype=np.float64)
    ys = [index[c] for c in stream.labels]
    make = LabeledInstance.from_array
    instances = [make(schema, xs[i], ys[i]) for i in range(len(ys))]  # built before the clock starts
    preds: list[int] = []
    append, predict, train = preds.append, model.predict, model.train
    gc.collect()
    t0 = time.perf_counter()
    for i, inst in enumerate(instances):
        p = predict(inst)
        append(-1 if p is None else int(p))
        if learn_mask is None or learn_mask[i]:
            train(inst)
    seconds = time.perf_counter() - t0
    return {"model": name, "family": "moa", "pred_index": preds, "seconds": seconds}


def run_majority(stream: Stream, learn_mask: Sequence[bool] | None = None) -> dict[str, Any]:
    counts: Counter[Any] = Counter()
    preds = []
    t0 = time.perf_counter()
    for i, y in enumerate(stream.ys):
        preds.append(counts.most_common(1)[0][0] if counts else None)
        if learn_mask is None or learn_mask[i]:
            counts[y] += 1
    return {"model": "majority class", "family": "baseline", "preds": preds, "seconds": time.perf_counter() - t0}


# -- metrics ----------------------------------------------------------------------


def correctness(stream: Stream, run: dict[str, Any]) -> np.ndarray:
    if "pred_index" in run:
        truth = [stream.classes.index(c) for c in stream.labels]
        return np.array(run.pop("pred_index")) == np.array(truth)
    preds = run.pop("preds")
    return np.array([p is not None and p == y for p, y in zip(preds, stream.ys)])


def rolling(correct: np.ndarray, window: int) -> np.ndarray:
    """r[t] = mean of correct[t-window+1 .. t] (NaN before a full window)."""
    c = np.concatenate([[0.0], np.cumsum(correct, dtype=np.float64)])
    out = np.full(len(correct), np.nan)
    out[window - 1 :] = (c[window:] - c[:-window]) / window
    return out


def recovery(correct: np.ndarray, at: int, window: int = WINDOW, level: float = RECOVERY_LEVEL) -> dict[str, Any]:
    r = rolling(correct, window)
    pre = float(r[at - 1])
    post = r[at + window - 1 :]  # windows made only of post-drift examples
    hit = np.nonzero(post >= level * pre)[0]
    after = r[at:]
    return {
        "pre_drift_rolling": pre,
        "min_rolling_after": float(np.nanmin(after)),
        "examples_to_recover": int(hit[0] + window) if hit.size else None,
        "final_rolling": float(r[-1]),
        "post_drift_accuracy": float(correct[at:].mean()),
    }


def finish(
    stream: Stream, repeats: list[dict[str, Any]], labeled: np.ndarray | None = None, *, keep: bool = False
) -> dict[str, Any]:
    """Accuracy and recovery from the predictions, throughput from the fastest repeat.

    Every repeat of a model must predict exactly the same (everything is
    seeded and single-threaded), so only the timing differs between them.
    """
    corrects = [correctness(stream, r) for r in repeats]
    correct = corrects[0]
    assert all(np.array_equal(correct, c) for c in corrects[1:]), f"{repeats[0]['model']} is not deterministic"
    run = repeats[0]
    if keep:
        run["_correct"] = correct  # for the caller, which pops it
    seconds = [r["seconds"] for r in repeats]
    n = len(correct)
    run["examples"] = n
    run["seconds"] = min(seconds)
    run["seconds_all"] = seconds
    run["examples_per_s"] = n / run["seconds"]
    run["us_per_example"] = run["seconds"] / n * 1e6
    if labeled is None:
        run["accuracy"] = float(correct.mean())
    else:
        run["accuracy"] = float(correct[labeled].mean())  # over examples whose label exists
        run["accuracy_hidden_truth"] = float(correct.mean())  # every example, against its true label
        run["accuracy_on_unlabeled"] = float(correct[~labeled].mean())
    at = stream.drift_at
    if at is not None:
        # With missing labels, rolling accuracy and recovery are against the true label of every example.
        run["pre_drift_accuracy"] = float(correct[:at].mean())
        run.update(recovery(correct, at))
        if "drifts" in run:
            # The first drift our detectors reported once the transition had begun (width/2 before P).
            width = max(at // 100, 1)
            after = [i for _, i in run["drifts"] if i >= at - width // 2]
            run["first_drift_after_change"] = after[0] - at if after else None
    if run.get("learner_accuracy") is not None:
        # Our capture must agree with what the learner scored itself (labeled examples only).
        mine = run["accuracy"]
        assert abs(mine - run["learner_accuracy"]) < 2e-3, (mine, run["learner_accuracy"])
    return run


def add_ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    river = [r for r in runs if r["family"] == "river"]
    best = max(river, key=lambda r: r["accuracy"])
    for r in runs:
        if r["family"] == "ours":
            r["throughput_vs_river_best"] = r["examples_per_s"] / best["examples_per_s"]
            r["accuracy_vs_river_best"] = r["accuracy"] - best["accuracy"]
            r["meets_goal"] = bool(r["accuracy"] >= best["accuracy"] and r["throughput_vs_river_best"] >= 10)
    return {"model": best["model"], "accuracy": best["accuracy"], "examples_per_s": best["examples_per_s"]}


# -- phases ------------------------------------------------------------------------


def main_configs() -> list[Ours]:
    return [
        default("mlp"),
        default("mlp", drift=False),
        default("logreg"),
        default("logreg", drift=False),
        tuned("mlp"),
        tuned("mlp", drift=False),
        tuned("logreg"),
    ]


def ablation_configs() -> list[Ours]:
    """One factor at a time away from TUNED (MLP, drift ON)."""
    return [
        tuned("mlp"),
        tuned("mlp", spike_factor=5.0),
        tuned("mlp", lr=0.005),
        tuned("mlp", lr=0.03),
        tuned("mlp", batch_size=16),
        tuned("mlp", batch_size=64),
        tuned("mlp", batch_size=256),
        tuned("mlp", hidden=(16,)),
        tuned("mlp", hidden=(128,)),
        tuned("mlp", hidden=(64, 64)),
        tuned("mlp", on_drift=("promote_challenger_if_better", "lr_boost", "checkpoint"), lr_boost_factor=2.0),
        tuned("mlp", drift=False),
    ]


def sweep_configs() -> list[Ours]:
    return [
        tuned("mlp", lr=lr, batch_size=batch, hidden=hidden)
        for lr in (0.005, 0.01, 0.03)
        for batch in (16, 32, 64, 256)
        for hidden in ((32,), (64,), (128,))
    ]


def run_stream(
    stream: Stream, configs: list[Ours], seed: int, *, river: bool = True, repeat: int = 1
) -> dict[str, Any]:
    events = to_events(stream)
    jobs: list[Callable[[], dict[str, Any]]] = []
    if river:
        jobs += [lambda name=name: run_river(name, stream, seed) for name in RIVER_MODELS]
        jobs.append(lambda: run_majority(stream))
    jobs += [lambda o=o: run_ours(stream, events, o) for o in configs]
    # Repeats go round all the models in turn, so a slow spell of the machine
    # does not fall on one model only; each model keeps its fastest repeat.
    raw: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for _ in range(repeat):
        for i, job in enumerate(jobs):
            raw[i].append(job())
    runs = [finish(stream, r) for r in raw]
    best = add_ratios(runs) if river else None
    return {
        "stream": stream.name,
        "description": stream.description,
        "examples": len(stream.xs),
        "drift_at": stream.drift_at,
        "classes": stream.classes,
        "features": stream.features,
        "repeat": repeat,
        "river_best": best,
        "runs": runs,
    }


def run_missing(stream: Stream, seed: int) -> dict[str, Any]:
    rng = random.Random(seed + 17)
    unlabeled = [rng.random() < UNLABELED_FRACTION for _ in stream.xs]
    labeled = ~np.array(unlabeled)
    events = to_events(stream, unlabeled)
    runs = []
    for name in RIVER_MODELS:
        runs.append(finish(stream, [run_river(name, stream, seed, learn_mask=labeled.tolist())], labeled))
    runs.append(finish(stream, [run_majority(stream, learn_mask=labeled.tolist())], labeled))
    for o in (
        default("mlp", pseudo=True),
        default("mlp", pseudo=False),
        tuned("mlp", pseudo=True),
        tuned("mlp", pseudo=False),
    ):
        runs.append(finish(stream, [run_ours(stream, events, o)], labeled))
    best = add_ratios(runs)
    return {
        "stream": stream.name,
        "unlabeled_fraction": UNLABELED_FRACTION,
        "unlabeled": int((~labeled).sum()),
        "river_best": best,
        "runs": runs,
    }


# -- targets (issue 14) -------------------------------------------------------------

TARGET_STREAMS = "agrawal,sea,shuttle,hyperplane,rbfdrift,led,mixed"
AFTER_DRIFT = 5000  # the accuracy in the first examples after each abrupt drift
LOW_LABELS = 0.1  # the labeled fraction of the low-label runs
# The targets for our default configuration (issue 14).
GOAL_GAP = -0.5  # accuracy points to the best River or MOA learner, at least
GOAL_X_ARF = 4.0  # our examples/s over MOA ARF's, at least
GOAL_PSEUDO_GAIN = 1.0  # points, pseudo-labels on vs off at 10 % labels, on at least half the streams
GOAL_PSEUDO_LOSS = -0.1  # points, never below
GOAL_REFUSALS = 0.005  # of all batches, refused by the spike guard with no drift involved

#: Configurations of ours the targets phase can run beside the default (--candidates).
CANDIDATES: dict[str, Ours] = {
    "wide": default("mlp", hidden=(128,)),
    "deep": default("mlp", hidden=(64, 64)),
    "pseudo-off": default("mlp", pseudo=False),
}


def after_drift(correct: np.ndarray, abrupt: Sequence[int], n: int = AFTER_DRIFT) -> list[float]:
    """The accuracy over the first ``n`` examples after each abrupt drift."""
    return [float(correct[d : d + n].mean()) for d in abrupt]


def refusals_without_drift(stream: Stream, run: dict[str, Any]) -> dict[str, Any]:
    """The batches the spike guard refused, and those of them outside [drift - width, drift + AFTER_DRIFT)."""
    width = max((stream.abrupt[0] if stream.abrupt else 0) // 100, 1)
    quiet = [i for i in run["rollback_at"] if not any(d - width <= i < d + AFTER_DRIFT for d in stream.abrupt)]
    batches = run["counts"]["batches"] + run["counts"]["rollbacks"] + run["counts"]["skipped_non_finite"]
    return {
        "refused": len(run["rollback_at"]),
        "refused_no_drift": len(quiet),
        "judged_batches": batches,
        "refused_no_drift_fraction": len(quiet) / batches if batches else 0.0,
    }


def run_targets(stream: Stream, seed: int, *, repeat: int, moa: bool, candidates: Sequence[str]) -> dict[str, Any]:
    """Every learner on the fully labeled stream, then ours at 10 % labels with pseudo-labels on and off."""
    events = to_events(stream)
    jobs: list[Callable[[], dict[str, Any]]] = [
        lambda name=name: run_river(name, stream, seed) for name in RIVER_TARGET_MODELS
    ]
    if moa:
        jobs += [lambda name=name: run_moa(name, stream, seed) for name in MOA_MODELS]
    ours = [default("mlp"), *(CANDIDATES[c] for c in candidates)]
    jobs += [lambda o=o: run_ours(stream, events, o) for o in ours]
    raw: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for _ in range(repeat):
        for i, job in enumerate(jobs):
            raw[i].append(job())
    runs = []
    for r in raw:
        run = finish(stream, r, keep=True)
        run["after_drift"] = after_drift(np.asarray(run.pop("_correct")), stream.abrupt)
        if run["family"] == "ours":
            run.update(refusals_without_drift(stream, run))
        runs.append(run)
    rng = random.Random(seed + 17)
    unlabeled = [rng.random() >= LOW_LABELS for _ in stream.xs]
    labeled = ~np.array(unlabeled)
    low_events = to_events(stream, unlabeled)
    low = []
    for o in (default("mlp", pseudo=True), default("mlp", pseudo=False)):
        run = finish(stream, [run_ours(stream, low_events, o)], labeled, keep=True)
        run["after_drift"] = after_drift(np.asarray(run.pop("_correct")), stream.abrupt)
        run.update(refusals_without_drift(stream, run))
        low.append(run)
    return {
        "stream": stream.name,
        "description": stream.description,
        "examples": len(stream.xs),
        "abrupt_drifts": stream.abrupt,
        "classes": stream.classes,
        "repeat": repeat,
        "runs": runs,
        "low_labels": {"labeled_fraction": LOW_LABELS, "labeled": int(labeled.sum()), "runs": low},
    }


def judge_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Our default configuration against each target, per stream, with the gaps."""
    rows = []
    for res in results:
        runs = res["runs"]
        ours = next(r for r in runs if r["model"] == "ours mlp drift default")
        rivals = [r for r in runs if r["family"] in ("river", "moa")]
        best = max(rivals, key=lambda r: r["accuracy"])
        arf = next((r for r in runs if r["model"] == "moa ARF"), None)
        on, off = res["low_labels"]["runs"]
        row: dict[str, Any] = {
            "stream": res["stream"],
            "ours_accuracy": ours["accuracy"],
            "best_model": best["model"],
            "best_accuracy": best["accuracy"],
            "gap_points": 100 * (ours["accuracy"] - best["accuracy"]),
            "ours_examples_per_s": ours["examples_per_s"],
            "arf_examples_per_s": arf["examples_per_s"] if arf else None,
            "x_arf": ours["examples_per_s"] / arf["examples_per_s"] if arf else None,
            "ours_after_drift": ours["after_drift"],
            "arf_after_drift": arf["after_drift"] if arf else None,
            "after_drift_gap_points": [100 * (a - b) for a, b in zip(ours["after_drift"], arf["after_drift"])]
            if arf
            else None,
            "pseudo_on_accuracy": on["accuracy_hidden_truth"],
            "pseudo_off_accuracy": off["accuracy_hidden_truth"],
            "pseudo_gain_points": 100 * (on["accuracy_hidden_truth"] - off["accuracy_hidden_truth"]),
            "pseudo_gain_labeled_points": 100 * (on["accuracy"] - off["accuracy"]),
            "refused_no_drift_full": ours["refused_no_drift_fraction"],
            "refused_no_drift_low": on["refused_no_drift_fraction"],
            "refused_no_drift_low_pseudo_off": off["refused_no_drift_fraction"],
        }
        rows.append(row)
    gains = [r["pseudo_gain_points"] for r in rows]
    refusals = [max(r["refused_no_drift_full"], r["refused_no_drift_low"]) for r in rows]
    x_arf = [r["x_arf"] for r in rows if r["x_arf"] is not None]
    drift_gaps = [g for r in rows for g in (r["after_drift_gap_points"] or [])]
    need = (len(rows) + 1) // 2
    goals = {
        "accuracy_within_0.5_of_best": {
            "met": all(r["gap_points"] >= GOAL_GAP for r in rows),
            "misses": {r["stream"]: round(r["gap_points"] - GOAL_GAP, 2) for r in rows if r["gap_points"] < GOAL_GAP},
        },
        "throughput_4x_moa_arf": {
            "met": bool(x_arf) and min(x_arf) >= GOAL_X_ARF,
            "misses": {
                r["stream"]: round(r["x_arf"] - GOAL_X_ARF, 2) for r in rows if r["x_arf"] and r["x_arf"] < GOAL_X_ARF
            },
        },
        "after_drift_at_least_moa_arf": {
            "met": bool(drift_gaps) and min(drift_gaps) >= 0,
            "misses": {
                f"{r['stream']}@{d}": round(g, 2)
                for r, res in zip(rows, results)
                for d, g in zip(res["abrupt_drifts"], r["after_drift_gap_points"] or [])
                if g < 0
            },
        },
        "pseudo_gain_1pt_on_half": {
            "met": sum(g >= GOAL_PSEUDO_GAIN for g in gains) >= need,
            "streams_with_gain": sum(g >= GOAL_PSEUDO_GAIN for g in gains),
            "needed": need,
        },
        "pseudo_never_below_-0.1": {
            "met": min(gains) >= GOAL_PSEUDO_LOSS,
            "misses": {
                r["stream"]: round(r["pseudo_gain_points"] - GOAL_PSEUDO_LOSS, 2)
                for r in rows
                if r["pseudo_gain_points"] < GOAL_PSEUDO_LOSS
            },
        },
        "refusals_no_drift_0.5%": {
            "met": max(refusals) <= GOAL_REFUSALS,
            "misses": {
                r["stream"]: round(100 * (f - GOAL_REFUSALS), 2) for r, f in zip(rows, refusals) if f > GOAL_REFUSALS
            },
        },
    }
    return {"rows": rows, "goals": goals}


def print_targets_stream(res: dict[str, Any]) -> None:
    print(f"\n== targets: {res['stream']}: {res['description']}, {res['examples']} examples ==")
    head = f"{'model':<34} {'acc':>6} {'ex/s':>8} {'first 5k after each drift':>26} {'refused (no drift)':>18}"
    print(head)
    print("-" * len(head))
    for r in res["runs"]:
        ad = " ".join(f"{a:.4f}" for a in r["after_drift"]) or "—"
        ref = f"{r['refused']} ({r['refused_no_drift']})/{r['judged_batches']}" if r["family"] == "ours" else ""
        print(f"{r['model']:<34} {r['accuracy']:>6.4f} {r['examples_per_s']:>8,.0f} {ad:>26} {ref:>18}")
    print(f"-- {res['low_labels']['labeled_fraction']:.0%} labels (acc: labeled / every example against its truth)")
    for r in res["low_labels"]["runs"]:
        ad = " ".join(f"{a:.4f}" for a in r["after_drift"]) or "—"
        ref = f"{r['refused']} ({r['refused_no_drift']})/{r['judged_batches']}"
        print(
            f"{r['model']:<34} {r['accuracy']:>6.4f}/{r['accuracy_hidden_truth']:.4f} {r['examples_per_s']:>8,.0f} "
            f"{ad:>19} {ref:>18} pseudo {r['counts']['pseudo']}"
        )


def print_targets(judged: dict[str, Any]) -> None:
    print("\n== targets for the default configuration (points; x = our ex/s over MOA ARF's) ==")
    head = (
        f"{'stream':<11} {'ours':>6} {'best rival':>22} {'gap':>6} {'x ARF':>6} {'after drift: ours-ARF':>22} "
        f"{'pseudo +/-':>10} {'refused':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in judged["rows"]:
        ad = " ".join(f"{g:+.2f}" for g in r["after_drift_gap_points"] or []) or "—"
        refused = 100 * max(r["refused_no_drift_full"], r["refused_no_drift_low"])
        best = f"{r['best_model']} {100 * r['best_accuracy']:.2f}"
        print(
            f"{r['stream']:<11} {100 * r['ours_accuracy']:>6.2f} {best:>22} "
            f"{r['gap_points']:>+6.2f} {_fmt(r['x_arf'], '.1f'):>6} {ad:>22} {r['pseudo_gain_points']:>+10.2f} "
            f"{refused:>7.2f}%"
        )
    for name, g in judged["goals"].items():
        extra = {k: v for k, v in g.items() if k != "met"}
        print(f"{'MET ' if g['met'] else 'MISS'} {name}: {extra if extra else ''}")


def _spin() -> None:
    while True:
        pass


def run_threads(stream: Stream, n: int, main_threads: int) -> dict[str, Any]:
    """Our MLP with torch's intra-op threads at 1 and 2, on the first ``n`` examples, on a quiet
    machine and next to one busy process (a CPU-bound child this bench starts and stops)."""
    head = dataclasses.replace(
        stream,
        xs=stream.xs[:n],
        ys=stream.ys[:n],
        drift_at=stream.drift_at if stream.drift_at and stream.drift_at < n else None,
    )
    events = to_events(head)
    runs = []
    try:
        for contended in (False, True):
            spinner = None
            if contended:
                spinner = multiprocessing.get_context("fork").Process(target=_spin, daemon=True)
                spinner.start()
            try:
                for o in (default("mlp"),):
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        run = finish(head, [run_ours(head, events, o)])
                        run.update(torch_threads=threads, contended=contended)
                        run["model"] += f" threads={threads}{' +1 busy process' if contended else ''}"
                        runs.append(run)
            finally:
                if spinner is not None:
                    spinner.terminate()
                    spinner.join()
    finally:
        torch.set_num_threads(main_threads)
    return {"stream": stream.name, "examples": n, "drift_at": head.drift_at, "runs": runs}


# -- output ---------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def print_main(res: dict[str, Any]) -> None:
    print(
        f"\n== {res['stream']}: {res['description']}, {res['examples']} examples, "
        f"best of {res['repeat']} timed repeats =="
    )
    best = res["river_best"]
    drift = res["drift_at"] is not None
    head = f"{'model':<44} {'acc':>6} {'ex/s':>8} {'xRiver':>6}"
    if drift:
        head += f" {'pre':>6} {'min':>6} {'recover':>7} {'post':>6} {'detect':>6} {'drifts':>6} {'rollbk':>6}"
    print(head)
    print("-" * len(head))
    for r in res["runs"]:
        ratio = r.get("throughput_vs_river_best")
        line = (
            f"{r['model']:<44} {r['accuracy']:>6.4f} {r['examples_per_s']:>8,.0f} "
            f"{_fmt(ratio, '.2f') if ratio else '':>6}"
        )
        if drift:
            ours = r["family"] == "ours"
            line += (
                f" {r['pre_drift_rolling']:>6.3f} {r['min_rolling_after']:>6.3f} "
                f"{_fmt(r['examples_to_recover'], 'd'):>7} {r['post_drift_accuracy']:>6.3f} "
                f"{_fmt(r.get('first_drift_after_change'), 'd') if ours else '':>6} "
                f"{len(r['drifts']) if ours else '':>6} {r['counts']['rollbacks'] if ours else '':>6}"
            )
        print(line)
    if best:
        print(
            f"River's best: {best['model']} (accuracy {best['accuracy']:.4f}, {best['examples_per_s']:,.0f} ex/s); "
            f"xRiver = our ex/s / its ex/s"
        )


def print_missing(res: dict[str, Any]) -> None:
    print(f"\n== missing labels: {res['stream']}, {res['unlabeled']} of the examples unlabeled ==")
    drift = "examples_to_recover" in res["runs"][0]
    head = f"{'model':<44} {'acc(lab)':>8} {'acc(all)':>8} {'acc(unl)':>8} {'ex/s':>8} {'xRiver':>6} {'pseudo':>6}"
    if drift:
        head += f" {'recover':>7} {'post':>6}"
    print(head)
    print("-" * len(head))
    for r in res["runs"]:
        ratio = r.get("throughput_vs_river_best")
        pseudo = r.get("counts", {}).get("pseudo", "")
        line = (
            f"{r['model']:<44} {r['accuracy']:>8.4f} {r['accuracy_hidden_truth']:>8.4f} "
            f"{r['accuracy_on_unlabeled']:>8.4f} {r['examples_per_s']:>8,.0f} "
            f"{_fmt(ratio, '.2f') if ratio else '':>6} {pseudo:>6}"
        )
        if drift:
            line += f" {_fmt(r['examples_to_recover'], 'd'):>7} {r['post_drift_accuracy']:>6.3f}"
        print(line)


def print_small(title: str, res: dict[str, Any]) -> None:
    print(f"\n== {title}: {res['stream']} ==")
    drift = res["drift_at"] is not None
    for r in res["runs"]:
        extra = (
            (
                f" pre {r['pre_drift_rolling']:.3f} min {r['min_rolling_after']:.3f} "
                f"recover {_fmt(r['examples_to_recover'], 'd')} post {r['post_drift_accuracy']:.3f} "
                f"rollbacks {r['counts']['rollbacks']}"
            )
            if drift
            else ""
        )
        print(f"{r['model']:<60} acc {r['accuracy']:.4f} {r['examples_per_s']:>8,.0f} ex/s{extra}")


def versions() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "river": version("river"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=50_000, help="synthetic stream length (Shuttle: all 49 097)")
    ap.add_argument("--drift-at", type=int, default=25_000)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--phases",
        default="targets",
        help="comma-separated: targets (issue 14: every stream against River and MOA), main, missing, threads, "
        "ablation (the earlier phases, on --streams)",
    )
    ap.add_argument("--target-streams", default=TARGET_STREAMS)
    ap.add_argument(
        "--candidates", default="", help=f"configurations of ours beside the default: {','.join(CANDIDATES)}"
    )
    ap.add_argument("--no-moa", action="store_true", help="skip the MOA models (CapyMOA) even if it is installed")
    ap.add_argument("--streams", default="agrawal,sea,shuttle")
    ap.add_argument(
        "--repeat", type=int, default=2, help="timed repeats of every model in the main tables (the fastest counts)"
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for our learner (the threads phase compares 1 and 2)",
    )
    ap.add_argument("--threads-examples", type=int, default=5_000, help="examples in the threads phase (0: skip)")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--no-missing", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="add the lr x batch x width grid around TUNED")
    ap.add_argument("--sweep-streams", default="agrawal,sea")
    ap.add_argument(
        "--out", type=Path, default=None, help=f"default {RESULTS_TARGETS.name} for targets alone, else {RESULTS.name}"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    info = machine_info()
    info.update(versions())
    t_all = time.perf_counter()
    phases_on = {p for p in args.phases.split(",") if p}
    if args.out is None:
        args.out = RESULTS_TARGETS if phases_on == {"targets"} and not args.sweep else RESULTS
    legacy = bool(phases_on & {"main", "missing", "threads", "ablation"}) or args.sweep
    names = [s for s in args.streams.split(",") if s] if legacy else []
    streams = {name: make_stream(name, args.examples, args.drift_at, args.seed) for name in names}
    moa = None if args.no_moa else moa_available()
    info["capymoa"] = moa
    result: dict[str, Any] = {
        "benchmark": "quality",
        "seed": args.seed,
        "repeat": args.repeat,
        "examples": args.examples,
        "drift_at": args.drift_at,
        "window": WINDOW,
        "recovery_level": RECOVERY_LEVEL,
        "unlabeled_fraction": UNLABELED_FRACTION,
        "tuned": {k: list(v) if isinstance(v, tuple) else v for k, v in TUNED.items()},
        "machine": info,
        "after_drift": AFTER_DRIFT,
        "low_labels": LOW_LABELS,
        "targets": [],
        "targets_judged": None,
        "main": [],
        "missing_labels": [],
        "threads": None,
        "ablation": [],
        "sweep": [],
    }
    phases: dict[str, float] = {}

    def phase(name: str, t: float) -> None:
        phases[name] = time.perf_counter() - t
        print(f"({phases[name]:.0f} s)")

    if "targets" in phases_on:
        if moa is None and not args.no_moa:
            print("CapyMOA is not installed (pip install capymoa, or the bench extra): the MOA models are skipped")
        candidates = [c for c in args.candidates.split(",") if c]
        for name in [n for n in args.target_streams.split(",") if n]:
            t = time.perf_counter()
            stream = make_stream(name, args.examples, args.drift_at, args.seed)
            res = run_targets(stream, args.seed, repeat=args.repeat, moa=moa is not None, candidates=candidates)
            result["targets"].append(res)
            print_targets_stream(res)
            phase(f"targets:{name}", t)
        if result["targets"]:
            result["targets_judged"] = judge_targets(result["targets"])
            print_targets(result["targets_judged"])
    for name, stream in streams.items() if "main" in phases_on else ():
        t = time.perf_counter()
        res = run_stream(stream, main_configs(), args.seed, repeat=args.repeat)
        result["main"].append(res)
        print_main(res)
        phase(f"main:{name}", t)
    if not args.no_missing and "missing" in phases_on:
        for name, stream in streams.items():
            t = time.perf_counter()
            res = run_missing(stream, args.seed)
            result["missing_labels"].append(res)
            print_missing(res)
            phase(f"missing:{name}", t)
    if args.threads_examples and "agrawal" in streams and "threads" in phases_on:
        t = time.perf_counter()
        res = run_threads(streams["agrawal"], args.threads_examples, args.torch_threads)
        result["threads"] = res
        print_small(f"torch intra-op threads, first {args.threads_examples} examples", res)
        phase("threads", t)
    if not args.no_ablation and "ablation" in phases_on:
        for name in [n for n in ("agrawal", "sea") if n in streams]:
            t = time.perf_counter()
            res = run_stream(streams[name], ablation_configs(), args.seed, river=False)
            result["ablation"].append(res)
            print_small("ablation (one factor away from TUNED, MLP, drift ON)", res)
            phase(f"ablation:{name}", t)
    if args.sweep:
        for name in [n for n in args.sweep_streams.split(",") if n in streams]:
            t = time.perf_counter()
            res = run_stream(streams[name], sweep_configs(), args.seed, river=False)
            result["sweep"].append(res)
            print_small("sweep around TUNED", res)
            phase(f"sweep:{name}", t)
    info["loadavg_at_end"] = list(os.getloadavg())
    result["phase_seconds"] = phases
    result["wall_seconds"] = time.perf_counter() - t_all
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"\nwall {result['wall_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
