"""Built-in models (logistic regression, MLP) and user models from a factory.

Every model maps a float32 batch ``[B, n_features]`` to ``[B, n_outputs]``:
class logits for classification (binary is two classes, so one softmax code
path serves both), one value for regression (in standardized target units).

A user model is named ``package.module:function``; the function is called
as ``function(n_features=..., n_outputs=..., **params)`` and must return an
``nn.Module``.

A spec with ``int8_layers`` (a served int8 variant, see
:mod:`stream_learner.optimize`) is the same architecture with those
``nn.Linear`` submodules replaced by
:class:`~stream_learner.optimize.int8.Int8Linear` (int8 weights and float32
scales as plain tensors). Specs without it write no such key, so the
architecture of an ordinary checkpoint is what it always was.

>>> spec = ModelSpec(kind="mlp", task="binary", features=["a", "b"], classes=["no", "yes"], hidden=[8])
>>> model = build_model(spec)
>>> model(torch.zeros(3, 2)).shape
torch.Size([3, 2])
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..optimize.int8 import replace_linears
from .frozen import add_lora

Task = Literal["binary", "multiclass", "regression"]


@dataclass(frozen=True)
class ModelSpec:
    """What to build: the architecture config stored in every manifest."""

    kind: str  # "logreg", "mlp" or "package.module:function"
    task: Task
    features: Sequence[str]
    classes: Sequence[str] = ()
    hidden: Sequence[int] = (64,)
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    #: Paths of the ``nn.Linear`` submodules stored and computed as int8 (an int8 variant); empty: none.
    int8_layers: Sequence[str] = ()
    #: Paths of the ``nn.Linear`` submodules given LoRA adapters (stream_learner.learn.frozen); empty: none.
    lora_layers: Sequence[str] = ()
    lora_rank: int = 0
    lora_alpha: float = 0.0

    def __post_init__(self) -> None:
        if not all(isinstance(p, str) and p for p in self.int8_layers):
            raise ValueError(f"int8_layers must be module paths, got {list(self.int8_layers)}")
        object.__setattr__(self, "int8_layers", tuple(self.int8_layers))
        if not all(isinstance(p, str) and p for p in self.lora_layers):
            raise ValueError(f"lora_layers must be module paths, got {list(self.lora_layers)}")
        object.__setattr__(self, "lora_layers", tuple(self.lora_layers))
        if self.lora_layers and not (
            isinstance(self.lora_rank, int)
            and self.lora_rank >= 1
            and math.isfinite(self.lora_alpha)
            and self.lora_alpha > 0
        ):
            raise ValueError(f"lora needs a rank >= 1 and alpha > 0, got {self.lora_rank} and {self.lora_alpha}")
        if self.task in ("binary", "multiclass"):
            if len(self.classes) < 2 or (self.task == "binary" and len(self.classes) != 2):
                raise ValueError(
                    f"task {self.task} needs {'two' if self.task == 'binary' else 'two or more'} "
                    f"classes, got {list(self.classes)}"
                )
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("a class is named twice")
        if self.kind not in ("logreg", "mlp") and ":" not in self.kind:
            raise ValueError(f"model kind must be logreg, mlp or package.module:function, not {self.kind!r}")

    @property
    def n_outputs(self) -> int:
        """Logits per class, or one regression value."""
        return 1 if self.task == "regression" else len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as written into a manifest's ``architecture``."""
        d = asdict(self)
        d["features"], d["classes"], d["hidden"] = list(self.features), list(self.classes), list(self.hidden)
        if self.int8_layers:
            d["int8_layers"] = list(self.int8_layers)
        else:
            del d["int8_layers"]  # an ordinary checkpoint's architecture, as older readers know it
        if self.lora_layers:
            d["lora_layers"] = list(self.lora_layers)
        else:  # likewise: a model without adapters writes what it always wrote
            del d["lora_layers"], d["lora_rank"], d["lora_alpha"]
        return d


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model; the same spec and seed give the same weights.

    With ``int8_layers``, those layers are empty int8 layers, to be filled from a checkpoint.
    """
    model = _build(spec)
    if spec.int8_layers:
        replace_linears(model, spec.int8_layers)
    return model


def _build(spec: ModelSpec) -> nn.Module:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = _construct(spec)
        if spec.lora_layers:  # drawn after the model's own init, from the same seeded generator
            add_lora(model, spec.lora_layers, spec.lora_rank, spec.lora_alpha)
        return model
    finally:
        # Building a model must not move the caller's global RNG.
        torch.random.set_rng_state(generator_state)


def _construct(spec: ModelSpec) -> nn.Module:
    n_in, n_out = len(spec.features), spec.n_outputs
    if spec.kind == "logreg":
        return nn.Linear(n_in, n_out)
    if spec.kind == "mlp":
        layers: list[nn.Module] = []
        width = n_in
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_out))
        return nn.Sequential(*layers)
    module_name, _, func_name = spec.kind.partition(":")
    factory = getattr(importlib.import_module(module_name), func_name)
    model = factory(n_features=n_in, n_outputs=n_out, **spec.params)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec.kind} returned {type(model).__name__}, not an nn.Module")
    return model


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
