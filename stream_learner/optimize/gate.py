"""The gate: a variant against its parent on the same held-out examples, and on latency here.

**Accuracy** (:func:`score`): parent and variant predict the same held-out
examples, which neither had trained on: the examples the session learned
*after* the parent's version (prequential, as every score here). Reported:
each one's accuracy and the variant's agreement with the parent's classes
(regression: each RMSE, and the variant's RMSE rise in percent of the
parent's). **Latency** (:func:`latency`): the whole prediction path
(:meth:`Predictor.predict <stream_learner.learn.predictor.Predictor.predict>`:
featurize, forward, answers) at batch 1 and 64, parent and variant
interleaved round by round so that a noisy neighbour slows both alike;
p50 and p99 in milliseconds.

**Decision** (:func:`decide`): published if the accuracy drop (points) or
the RMSE rise (percent) is at most ``max_drop``, and, for a speed variant
(int8, pruned, student), its p50 at the serving batch size is at least
``min_speedup`` times faster than the parent's. Otherwise skipped with the
reason, counted by label (``accuracy``, ``slower``, ``too_few_examples``,
``not_applicable``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..learn.predictor import Predictor
from .variants import SPEED_VARIANTS
from .window import Window

__all__ = ["GateConfig", "Verdict", "decide", "latency", "score"]


@dataclass(frozen=True)
class GateConfig:
    """The gate's settings (``variant_*``)."""

    max_drop: float = 0.5
    min_speedup: float = 1.1
    serving_batch: int = 1
    heldout_examples: int = 1000
    min_heldout_examples: int = 200
    latency_budget_s: float = 0.3


@dataclass(frozen=True)
class Verdict:
    """Publish or not, and why not (``label`` is the counted reason)."""

    publish: bool
    label: str = ""
    reason: str = ""


def score(parent: Predictor, variant: Predictor, heldout: Window, *, batch: int = 256) -> dict[str, float]:
    """Both models on the labeled held-out examples (see the module docstring)."""
    data = heldout.labeled()
    outs: list[list[torch.Tensor]] = [[], []]
    for start in range(0, len(data), batch):
        raw = data.raw[start : start + batch]
        for i, p in enumerate((parent, variant)):
            outs[i].append(p.forward(p.featurizer.standardize(raw)))
    n = len(data)
    m: dict[str, float] = {"heldout_examples": float(n)}
    if n == 0:
        return m
    out_p, out_v = torch.cat(outs[0]), torch.cat(outs[1])
    if parent.spec.task == "regression":
        y = data.labels
        pred_p, pred_v = np.array(parent.values(out_p)), np.array(variant.values(out_v))
        rmse_p, rmse_v = float(np.sqrt(np.mean((pred_p - y) ** 2))), float(np.sqrt(np.mean((pred_v - y) ** 2)))
        m.update(
            parent_rmse=rmse_p, rmse=rmse_v, rmse_rise_percent=100.0 * (rmse_v - rmse_p) / rmse_p if rmse_p > 0 else 0.0
        )
        return m
    y_t = torch.from_numpy(data.labels).long()
    arg_p, arg_v = out_p.argmax(dim=1), out_v.argmax(dim=1)
    acc_p, acc_v = float((arg_p == y_t).double().mean()), float((arg_v == y_t).double().mean())
    m.update(
        parent_accuracy=acc_p,
        accuracy=acc_v,
        accuracy_drop_points=100.0 * (acc_p - acc_v),
        agreement=float((arg_p == arg_v).double().mean()),
    )
    return m


def latency(
    predictors: Sequence[Predictor],
    rows: Sequence[dict[str, float | None]],
    *,
    batches: Sequence[int] = (1, 64),
    budget_s: float = 0.3,
    min_repeats: int = 15,
    max_repeats: int = 2000,
) -> list[dict[str, float]]:
    """Per predictor, ``latency_b{B}_p50_ms`` and ``_p99_ms`` for each batch size (module docstring).

    Each round predicts one batch with every predictor in turn; rounds go on
    until ``budget_s`` per batch size has passed (at least ``min_repeats``).
    """
    out: list[dict[str, float]] = [{} for _ in predictors]
    if not rows:
        return out
    for b in batches:
        batch = [rows[i % len(rows)] for i in range(b)]
        samples: list[list[float]] = [[] for _ in predictors]
        for p in predictors:  # warm-up: first-call allocations are not what a server pays
            p.predict(batch)
        began = time.perf_counter()
        while len(samples[0]) < max_repeats and (
            len(samples[0]) < min_repeats or time.perf_counter() - began < budget_s
        ):
            for i, p in enumerate(predictors):
                t = time.perf_counter()
                p.predict(batch)
                samples[i].append((time.perf_counter() - t) * 1000.0)
        for i, s in enumerate(samples):
            out[i][f"latency_b{b}_p50_ms"] = float(np.percentile(s, 50))
            out[i][f"latency_b{b}_p99_ms"] = float(np.percentile(s, 99))
    return out


def decide(name: str, measured: dict[str, float], config: GateConfig) -> Verdict:
    """Publish ``name`` with these measurements, or skip it with a reason (module docstring)."""
    n = measured.get("heldout_examples", 0.0)
    if n < config.min_heldout_examples:
        return Verdict(
            False,
            "too_few_examples",
            f"{name}: {int(n)} held-out labeled examples, fewer than {config.min_heldout_examples}",
        )
    if "accuracy_drop_points" in measured and measured["accuracy_drop_points"] > config.max_drop:
        return Verdict(
            False,
            "accuracy",
            f"{name}: accuracy {measured['accuracy']:.4f} vs parent {measured['parent_accuracy']:.4f} "
            f"on {int(n)} held-out examples, a drop of {measured['accuracy_drop_points']:.2f} points "
            f"> {config.max_drop}",
        )
    if "rmse_rise_percent" in measured and measured["rmse_rise_percent"] > config.max_drop:
        return Verdict(
            False,
            "accuracy",
            f"{name}: RMSE {measured['rmse']:.4g} vs parent {measured['parent_rmse']:.4g}, "
            f"{measured['rmse_rise_percent']:.2f}% higher > {config.max_drop}%",
        )
    if name in SPEED_VARIANTS:
        key = f"latency_b{config.serving_batch}_p50_ms"
        mine, theirs = measured.get(key), measured.get(f"parent_{key}")
        if mine is None or theirs is None:
            return Verdict(False, "slower", f"{name}: latency at batch {config.serving_batch} not measured")
        speedup = theirs / mine if mine > 0 else float("inf")
        if speedup < config.min_speedup:
            return Verdict(
                False,
                "slower",
                f"{name}: p50 {mine:.3f} ms vs parent {theirs:.3f} ms at batch {config.serving_batch} "
                f"({speedup:.2f}x, needs {config.min_speedup}x)",
            )
    return Verdict(True)
