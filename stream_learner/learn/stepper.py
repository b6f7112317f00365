"""The learner's last stage: one guarded optimizer step on a chunk's training batch.

The step is skipped when the loss or a gradient is not finite, and refused
when the :class:`~stream_learner.learn.parts.SpikeGuard` judges the loss of
the truly labeled examples a spike: the model and its optimizer go back to
the last good state (:meth:`~stream_learner.learn.trainable.Trainable.rollback`).
Gradients are clipped to ``clip_norm``; the
:class:`~stream_learner.learn.parts.LrSchedule` runs a drift policy's
learning-rate boost down. The guard and the schedule are this part's state,
saved and restored by it.

At the default batch of 32 the step is mostly per-call overhead, so the
Python around torch's kernels is cut where the result is the same bits: the
gradient norm and the clip are one ``_foreach_*`` call each for gradients of
one device and dtype (:func:`total_norm`, :func:`clip_with_norm`), gradients
are set to ``None`` directly, and fused Adam/AdamW is its kernel called
directly (:meth:`~stream_learner.learn.trainable.Trainable.step_optimizer`).

In a data-parallel group (:class:`~stream_learner.learn.ranks.RankGroup`)
every rank holds the whole batch but computes the gradient of its slice of
the rows only; one all-reduce sums the gradients and gathers the
per-example losses, and the rest of the step (the finite checks, the guard,
clipping, the update) runs on every rank on the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .featurizer import ModelInput, move_input
from .parts import LrSchedule, SpikeGuard, Tensors
from .predictor import set_training
from .trainable import Trainable

if TYPE_CHECKING:
    from .ranks import RankGroup

__all__ = ["Stepper", "clip_with_norm", "total_norm"]


def _one_group(grads: list[torch.Tensor]) -> bool:
    """True if the gradients are dense, on one CPU or CUDA device, of one dtype: torch's norm and
    clip then make exactly one ``_foreach_*`` call each, which these functions make directly."""
    first = grads[0]
    device, dtype = first.device, first.dtype
    if device.type not in ("cpu", "cuda"):
        return False
    return all(g.device == device and g.dtype == dtype and g.layout is torch.strided for g in grads)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``nn.utils.get_total_norm(grads)`` (2-norm), bit for bit, without its grouping by device and
    dtype when there is one group (~12 against ~25 us per step at the default batch)."""
    if not _one_group(grads):
        return nn.utils.get_total_norm(grads)
    with torch.no_grad():
        norm: torch.Tensor = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    return norm


def clip_with_norm(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """``nn.utils.clip_grads_with_norm_`` of these gradients, bit for bit: each is multiplied by
    ``min(max_norm / (norm + 1e-6), 1)``; skipped when that is exactly 1 (a multiplication by 1
    changes no value)."""
    with torch.no_grad():
        coef = torch.clamp(float(max_norm) / (norm + 1e-6), max=1.0)
        if float(coef) == 1.0:
            return
        if _one_group(grads):
            torch._foreach_mul_(grads, coef)
        else:
            for g in grads:  # torch's own path per group: the same elementwise products
                g.mul_(coef.to(g.device))


class Stepper:
    """Steps a model on a batch, guarded (module docstring).

    ``counts`` is the learner's own tally, shared: this part bumps
    ``batches``, ``skipped_non_finite`` and ``rollbacks`` in it.
    """

    def __init__(
        self,
        *,
        regression: bool,
        clip_norm: float,
        lr: float,
        spike_factor: float,
        spike_warmup_batches: int,
        spike_patience: int,
        counts: dict[str, int],
        group: RankGroup | None = None,
    ) -> None:
        self.regression = regression
        self.group = group if group is not None and group.world > 1 else None
        self.clip_norm = clip_norm
        self.counts = counts
        self.guard = SpikeGuard(spike_factor, spike_warmup_batches, spike_patience)
        self.lr = LrSchedule(lr)

    def step(
        self,
        t: Trainable,
        x: ModelInput,
        y: torch.Tensor,
        w: torch.Tensor,
        *,
        count: bool,
        truth: list[int] | None = None,
    ) -> float:
        """One optimizer step; returns the batch loss (NaN when skipped). Only the main model
        (``count``) is counted, guarded against spikes (on the per-example losses of the rows at
        ``truth``, the truly labeled ones) and scheduled."""
        set_training(t.model, True)
        if t.device.type != "cpu":
            x, y, w = move_input(x, t.device), y.to(t.device), w.to(t.device)
        if self.group is None:
            per = self._per_example(t.model(x), y)
        else:
            per = self._shared_backward(t, x, y, w, self.group)  # the gradients are set, summed
        loss = (per * w).sum() / w.sum()
        value = float(loss.detach())
        if not math.isfinite(value):
            if count:
                self.counts["skipped_non_finite"] += 1
            return math.nan
        labeled: list[float] = []
        if count:
            # One conversion of the batch's losses, then the truly labeled ones picked in Python:
            # indexing the tensor by a list first costs ~15 us per step.
            losses = per.detach().tolist()
            labeled = losses if truth is None or len(truth) == len(losses) else [losses[i] for i in truth]
        if count and self.guard.check(labeled) == "rollback":
            # The current weights produce an abnormal loss: go back to the last
            # weights that did not, and do not learn from this batch.
            if t.rollback():
                self.counts["rollbacks"] += 1
            return math.nan
        params = t.learning()
        if self.group is None:
            for p in params:  # optimizer.zero_grad(set_to_none=True), without its profiler record
                p.grad = None
            torch.autograd.backward(loss)
        grads = [p.grad for p in params if p.grad is not None]
        # A finite total norm means every gradient is finite: one check instead of one per
        # tensor, and the norm is the one clipping needs (clip_grad_norm_ is exactly
        # get_total_norm then clip_grads_with_norm_). Only a non-finite norm (which finite but
        # huge gradients can also give) needs the per-tensor check.
        norm = total_norm(grads) if self.clip_norm > 0 and grads else None
        if (norm is None or not math.isfinite(float(norm))) and not all(bool(torch.isfinite(g).all()) for g in grads):
            for p in params:
                p.grad = None
            if count:
                self.counts["skipped_non_finite"] += 1
            return math.nan
        if norm is not None:
            clip_with_norm(grads, self.clip_norm, norm)
        t.remember_good()
        t.step_optimizer()
        if count:
            self.counts["batches"] += 1
            self.guard.learned(labeled)
            self.lr.stepped(t.optimizer)
        return value

    def _per_example(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return (out[:, 0] - y) ** 2
        return nn.functional.cross_entropy(out, y, reduction="none")

    def _shared_backward(
        self, t: Trainable, x: ModelInput, y: torch.Tensor, w: torch.Tensor, group: RankGroup
    ) -> torch.Tensor:
        """This rank's slice forward and backward, then one all-reduce of [gradients, losses, which
        parameters have a gradient]: the summed gradients are set, the batch's losses returned.

        A row's loss is scaled by the whole batch's weight, so the sum over the ranks is the
        gradient of the batch loss; a parameter no rank's slice reached keeps no gradient, as it
        would in one process (the optimizer then leaves it alone)."""
        n = len(y)
        lo, hi = group.rows(n)
        params = t.learning()
        t.optimizer.zero_grad(set_to_none=True)
        per_all = torch.zeros(n, dtype=torch.float32, device=t.device)
        if hi > lo:
            rows = slice(lo, hi)
            xs = x[rows] if isinstance(x, torch.Tensor) else {k: v[rows] for k, v in x.items()}
            per = self._per_example(t.model(xs), y[rows])
            torch.autograd.backward((per * w[rows]).sum() / w.sum())
            per_all[rows] = per.detach().float()
        has = [p.grad is not None for p in params]
        flat = [
            p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=t.device)
            for p in params
        ]
        buffer = torch.cat([*flat, per_all, torch.tensor(has, dtype=torch.float32, device=t.device)])
        group.all_reduce(buffer)
        at = 0
        for p, flag in zip(params, buffer[buffer.numel() - len(params) :].tolist(), strict=True):
            size = p.numel()
            p.grad = buffer[at : at + size].view_as(p).to(p.dtype) if flag > 0 else None
            at += size
        return buffer[at : at + n]

    def save(self, tensors: Tensors) -> dict[str, Any]:
        """The guard's recent losses (into ``tensors``), and the JSON-able rest of the guard and the schedule."""
        return {**self.guard.save(tensors), **self.lr.save()}

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`save` wrote."""
        self.guard.load(tensors, meta)
        self.lr.load(meta)
