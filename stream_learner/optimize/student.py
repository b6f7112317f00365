"""The distilled student: a smaller model trained online alongside the teacher, a learner part.

On every chunk the student takes one optimizer step on every example the
teacher predicted, unlabeled ones included, with the loss of knowledge
distillation (:func:`distill_loss`): ``alpha * T^2 * KL(softmax(t/T) ||
softmax(s/T)) + (1 - alpha) * cross-entropy(s, label)`` where a label
exists (``t`` the teacher's prequential logits for the chunk, computed before
the teacher learns it; for regression, squared errors to the teacher's
output and to the label). Its model and optimizer are saved in the learner's
state under ``student.*`` (:class:`~stream_learner.learn.trainable.Trainable`'s
layout), so a restored trainer continues it bit for bit, like the teacher.

The student's architecture is an MLP: ``hidden`` from the settings, or a
quarter of the teacher's widths (:func:`student_spec`).

>>> from stream_learner.learn.models import ModelSpec
>>> teacher = ModelSpec(kind="mlp", task="binary", features=["a"], classes=["n", "y"], hidden=(256, 128))
>>> student_spec(teacher).hidden
(64, 32)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..learn.models import ModelSpec
from ..learn.predictor import set_training
from ..learn.trainable import Trainable

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StudentConfig:
    """How the student is shaped and trained (the ``trainer_student_*`` settings)."""

    hidden: Sequence[int] = ()  # empty: a quarter of the teacher's widths
    alpha: float = 0.5
    temperature: float = 2.0
    lr: float | None = None  # None: the teacher's


def student_spec(teacher: ModelSpec, hidden: Sequence[int] = ()) -> ModelSpec:
    """The student's architecture: an MLP of ``hidden`` widths (default: a quarter of an MLP
    teacher's, at least 4 each; a non-MLP teacher needs them given). Raises ``ValueError`` when
    there is nothing smaller to build (a logistic regression teacher)."""
    if not hidden:
        if teacher.kind != "mlp":
            raise ValueError(f"the teacher is {teacher.kind!r}: give the student's widths (trainer_student_hidden)")
        hidden = tuple(max(4, h // 4) for h in teacher.hidden)
    return dataclasses.replace(
        teacher, kind="mlp", hidden=tuple(hidden), params={}, int8_layers=(), seed=teacher.seed + 1
    )


def distill_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    labels: torch.Tensor,
    *,
    regression: bool,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Per-example distillation loss (see the module docstring); ``labels`` NaN where there is none
    (classes as float indices, regression values standardized as the teacher learns them)."""
    has = ~torch.isnan(labels)
    if regression:
        soft = (student_out[:, 0] - teacher_out[:, 0]) ** 2
        hard = torch.where(has, (student_out[:, 0] - torch.nan_to_num(labels)) ** 2, torch.zeros_like(soft))
    else:
        t = temperature
        log_p = nn.functional.log_softmax(student_out / t, dim=1)
        q = nn.functional.softmax(teacher_out / t, dim=1)
        soft = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(dim=1) * (t * t)
        ce = nn.functional.cross_entropy(student_out, torch.nan_to_num(labels).long(), reduction="none")
        hard = torch.where(has, ce, torch.zeros_like(ce))
    return alpha * soft + (1 - alpha) * torch.where(has, hard, torch.zeros_like(hard))


class Student:
    """The student part: its :class:`Trainable` and one distillation step per chunk."""

    def __init__(
        self,
        teacher: ModelSpec,
        config: StudentConfig,
        *,
        optimizer: str,
        lr: float,
        weight_decay: float,
        clip_norm: float,
    ) -> None:
        self.config = config
        self.spec = student_spec(teacher, config.hidden)
        self.clip_norm = clip_norm
        self.trainable = Trainable(self.spec, optimizer, config.lr or lr, weight_decay)
        self.steps = 0
        self.skipped = 0

    @property
    def model(self) -> nn.Module:
        """The student network."""
        return self.trainable.model

    def learn(self, x: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor, *, regression: bool) -> float:
        """One step on a chunk: ``x`` as the teacher saw it, its prequential outputs, the labels."""
        model, opt = self.trainable.model, self.trainable.optimizer
        set_training(model, True)
        out = model(x)
        loss = distill_loss(
            out,
            teacher_out.detach(),
            labels,
            regression=regression,
            alpha=self.config.alpha,
            temperature=self.config.temperature,
        ).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            self.skipped += 1
            return math.nan
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not math.isfinite(float(norm)):
            opt.zero_grad(set_to_none=True)
            self.skipped += 1
            return math.nan
        if self.clip_norm > 0:
            nn.utils.clip_grads_with_norm_(params, self.clip_norm, norm)
        opt.step()
        self.steps += 1
        return value

    def servable(self) -> dict[str, torch.Tensor]:
        """The student's weights as a checkpoint names them (``model.*``), cloned."""
        return {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}

    def save(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        """Under ``student.*`` (the model, the optimizer), and the counters."""
        self.trainable.save(tensors, meta, "student")
        meta["student_steps"], meta["student_skipped"] = self.steps, self.skipped

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`save` wrote."""
        self.trainable.load(tensors, meta, "student")
        self.steps, self.skipped = int(meta["student_steps"]), int(meta["student_skipped"])
