"""The one prediction path: featurize -> network -> probabilities or a de-standardized value.

The learner predicts every example with it before learning (prequential
scoring, pseudo-labels, drift signals) and a serving node answers requests
with it, so a served prediction equals the learner's by construction: the
same featurizer statistics, the same network in eval mode without autograd,
softmax in float64 for classes, ``out * std + mean`` for a regression
value. For the same batch of rows the values are the same bit for bit; a
row predicted in a batch of another size may differ in float32 rounding
(about 1e-7 relative), as torch's CPU kernels depend on the batch shape.

>>> from stream_learner.learn.models import ModelSpec, build_model
>>> spec = ModelSpec(kind="logreg", task="binary", features=["a"], classes=["no", "yes"])
>>> p = Predictor(spec, Featurizer(spec.features), TargetScaler(), build_model(spec))
>>> sorted(p.predict([{"a": 1.0}])[0])
['no', 'yes']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..events import class_name
from .featurizer import Featurizer, ModelInput, move_input
from .models import ModelSpec
from .target import TargetScaler

Rows = Sequence[Mapping[str, Any]]


def set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)`` unless it is in that mode already.

    ``train`` walks every submodule (and ``nn.Module.__setattr__`` is slow): the learner switches
    its model twice a chunk, so when no module overrides ``train`` the flag is set directly on
    each, which is all ``nn.Module.train`` does.
    """
    if model.training is mode:
        return
    modules = list(model.modules())
    if all(type(m).train is _MODULE_TRAIN for m in modules):
        for m in modules:
            object.__setattr__(m, "training", mode)  # a plain attribute: what Module.__setattr__ ends in
    else:
        model.train(mode)


_MODULE_TRAIN = nn.Module.train


def _device(network: nn.Module) -> torch.device | None:
    """The network's device when it is not the CPU (None: the CPU, or no parameters)."""
    for param in network.parameters():
        return None if param.device.type == "cpu" else param.device
    return None


@dataclass(frozen=True, eq=False)
class Predictor:
    """A network with the statistics that turn rows into its inputs and its outputs into answers."""

    spec: ModelSpec
    featurizer: Featurizer
    target: TargetScaler
    network: nn.Module

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in output order (empty for regression)."""
        return tuple(class_name(c) for c in self.spec.classes)

    def featurize(self, rows: Rows, *, learn: bool = False) -> ModelInput:
        """The model's inputs (:class:`~stream_learner.learn.featurizer.RowsRefused` for rows that do not fit
        the spec); ``learn`` also updates the statistics (the learner only)."""
        return self.featurizer.transform(rows, learn=learn)

    def forward(self, x: ModelInput) -> torch.Tensor:
        """The network's raw output in eval mode, without autograd: logits, or standardized values."""
        set_training(self.network, False)
        device = _device(self.network)
        with torch.no_grad():
            out: torch.Tensor = self.network(x if device is None else move_input(x, device))
        # Probabilities, values and scores are computed on the CPU whatever device the network is on.
        return out if device is None else out.cpu()

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        """Class probabilities (float64 softmax over the logits)."""
        return torch.softmax(out.double(), dim=1)

    def values(self, out: torch.Tensor) -> list[float]:
        """Regression values in target units."""
        mean, std = self.target.mean_std()
        values: list[float] = (out[:, 0].double() * std + mean).tolist()
        return values

    def answers(self, out: torch.Tensor) -> list[float | dict[str, float]]:
        """Per row, a regression value or ``{class name: probability}`` (``PredictionEvent.prediction``)."""
        if self.spec.task == "regression":
            return list(self.values(out))
        classes = self.classes
        return [dict(zip(classes, row)) for row in self.probabilities(out).tolist()]

    def predict(self, rows: Rows) -> list[float | dict[str, float]]:
        """Featurize (statistics unchanged), forward, answer."""
        if not rows:
            return []
        return self.answers(self.forward(self.featurize(rows)))
