"""The one way to build a serving variant: (parent, recipe, recent window) -> (servable weights, recipe).

:func:`make_variant` is what the trainer's session hook, the
``stream-learner optimize`` role and replay all call; the gate
(:mod:`~stream_learner.optimize.gate`) then measures the result against its
parent and decides. A variant is served through the same
:class:`~stream_learner.learn.predictor.Predictor` as its parent: its
``spec`` is an ordinary :class:`~stream_learner.learn.models.ModelSpec`
(an MLP of other widths, or the parent's architecture with ``int8_layers``)
and its ``tensors`` are a checkpoint's (``model.*``, the parent's featurizer
and target statistics), so a serving node builds it like any checkpoint.

Recipes (:data:`DEFAULT_RECIPES`; every parameter is recorded, signed, in the variant's manifest):

``int8``
    the ``nn.Linear`` layers with at least ``min_features`` inputs and
    outputs become :class:`~stream_learner.optimize.int8.Int8Linear`
    (int8 weights, per-output-channel float32 scales, activations quantized
    per row at run time). No fine-tune.
``pruned``
    structured pruning of an MLP: in every hidden layer the ``fraction`` of
    units with the smallest ``‖incoming weights‖₂ · ‖outgoing weights‖₂``
    are removed, giving a smaller dense MLP; then a short fine-tune on the
    window (below).
``sparse``
    unstructured magnitude pruning: in every linear layer the ``fraction``
    of weights smallest in magnitude are set to zero (kept zero through the
    fine-tune). The model is as large and as fast as its parent (dense
    kernels); what it buys is a smaller *compressed* checkpoint.
``student``
    the distilled student the learner trains alongside its teacher
    (:mod:`~stream_learner.optimize.student`): taken as it is at the version.

**Fine-tune** (``pruned``, ``sparse``): ``epochs`` passes over the window's
examples in batches of ``batch``, shuffled by a generator seeded with
``seed``, Adam at ``lr``, loss :func:`~stream_learner.optimize.student.distill_loss`
against the parent's outputs (``alpha``, ``temperature``), so unlabeled
examples count too. Deterministic: the same parent, recipe and window give
the same bytes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoint.codec import encode_tensors
from ..learn.featurizer import STATS
from ..learn.learner import LearnerConfig
from ..learn.models import ModelSpec, build_model
from ..learn.predictor import Predictor, set_training
from ..learn.target import TargetScaler
from .int8 import Int8Linear
from .student import distill_loss
from .window import Window

__all__ = [
    "DEFAULT_RECIPES",
    "NAMES",
    "SPEED_VARIANTS",
    "Parent",
    "Servable",
    "Variant",
    "VariantSkipped",
    "make_variant",
    "recipe_of",
]

#: The variants there are, in the order they are built.
NAMES = ("int8", "pruned", "sparse", "student")
#: Variants whose point is speed: the gate wants them measurably faster than their parent.
SPEED_VARIANTS = frozenset({"int8", "pruned", "student"})

_FINETUNE = {"epochs": 2, "batch": 32, "lr": 0.001, "alpha": 0.5, "temperature": 2.0, "seed": 0}
#: Each recipe's parameters and their defaults.
DEFAULT_RECIPES: dict[str, dict[str, Any]] = {
    "int8": {"min_features": 16},
    "pruned": {"fraction": 0.5, "criterion": "l2_in_out", **_FINETUNE},
    "sparse": {"fraction": 0.5, "criterion": "magnitude", **_FINETUNE},
    "student": {},
}


class VariantSkipped(Exception):
    """The recipe does not apply to this parent (the reason is counted and logged, nothing published)."""

    def __init__(self, reason: str, label: str = "not_applicable") -> None:
        super().__init__(reason)
        self.label = label


def recipe_of(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full recipe of variant ``name``: its defaults with ``overrides``, and ``name`` itself.

    >>> recipe_of("int8")
    {'min_features': 16, 'name': 'int8'}
    >>> recipe_of("pruned", {"fraction": 0.25})["fraction"]
    0.25
    """
    if name not in DEFAULT_RECIPES:
        raise ValueError(f"unknown variant {name!r}: use {', '.join(NAMES)}")
    unknown = sorted(set(overrides or {}) - set(DEFAULT_RECIPES[name]))
    if unknown:
        raise ValueError(f"variant {name} has no parameter {unknown}; it takes {sorted(DEFAULT_RECIPES[name])}")
    return {**DEFAULT_RECIPES[name], **(overrides or {}), "name": name}


@dataclass(frozen=True, eq=False)
class Servable:
    """A model as a checkpoint holds it: its spec and tensors (``model.*``, featurizer, target)."""

    spec: ModelSpec
    tensors: dict[str, torch.Tensor]

    def predictor(self, config: LearnerConfig | None = None) -> Predictor:
        """A :class:`Predictor` of it, built as a serving node builds one (strict load, eval mode)."""
        network = build_model(self.spec)
        network.load_state_dict(
            {k[len("model.") :]: v for k, v in self.tensors.items() if k.startswith("model.")}, strict=True
        )
        network.eval()
        network.requires_grad_(False)
        featurizer = (config or LearnerConfig(model_name="variant", spec=self.spec)).featurizer()
        featurizer.load_state_dict({name: self.tensors[name] for name in STATS})
        target = TargetScaler()
        target.load_tensor(self.tensors["target"])
        return Predictor(self.spec, featurizer, target, network)

    @property
    def parameters(self) -> int:
        """Numbers in the model's tensors (int8 weights and their scales included)."""
        return sum(t.numel() for k, t in self.tensors.items() if k.startswith("model."))

    def weights_bytes(self, model: str) -> bytes:
        """The safetensors file a checkpoint of it publishes."""
        return encode_tensors(self.tensors, {"model": model})


@dataclass(frozen=True, eq=False)
class Parent:
    """What a variant is derived from: a version's servable model, and the student at that version."""

    model: str
    version: int
    servable: Servable
    student: Servable | None = None


@dataclass(frozen=True, eq=False)
class Variant:
    """A variant built by :func:`make_variant`, not yet gated."""

    name: str
    servable: Servable
    recipe: dict[str, Any]
    build_seconds: float
    details: dict[str, float] = field(default_factory=dict)


def make_variant(parent: Parent, recipe: Mapping[str, Any], window: Window) -> Variant:
    """Build the variant ``recipe`` describes (see the module docstring) from ``parent``.

    ``window``: the recent examples before the parent's version (raw rows
    and labels), for the fine-tune. Raises :class:`VariantSkipped` when the
    recipe does not apply (nothing to quantize, not an MLP, no student).
    """
    began = time.perf_counter()
    name = str(recipe["name"])
    spec, tensors = parent.servable.spec, parent.servable.tensors
    details: dict[str, float] = {}
    if name == "int8":
        out = _int8(spec, tensors, int(recipe["min_features"]))
    elif name == "pruned":
        out = _pruned(spec, tensors, float(recipe["fraction"]))
        out = _finetune(parent.servable, out, recipe, window, masks=None)
    elif name == "sparse":
        out, masks = _sparse(spec, tensors, float(recipe["fraction"]))
        out = _finetune(parent.servable, out, recipe, window, masks=masks)
        zeros = sum(int((~m).sum()) for m in masks.values())
        details["zero_fraction"] = zeros / max(1, sum(m.numel() for m in masks.values()))
    elif name == "student":
        if parent.student is None:
            raise VariantSkipped("no student: the learner trains none (trainer_variants lacks student)")
        out = parent.student
    else:
        raise ValueError(f"unknown variant {name!r}")
    return Variant(name, out, dict(recipe), time.perf_counter() - began, details)


def _stats(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith("model.")}


def _network(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    net = build_model(spec)
    net.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    return net


def _int8(spec: ModelSpec, tensors: dict[str, torch.Tensor], min_features: int) -> Servable:
    if spec.int8_layers:
        raise VariantSkipped("the parent is int8 already")
    net = _network(spec, tensors)
    paths = [
        name
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= min_features
    ]
    if not paths:
        raise VariantSkipped(
            f"no linear layer with at least {min_features} inputs and outputs: nothing worth quantizing"
        )
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        holder = net.get_submodule(parent_path) if parent_path else net
        setattr(holder, attr, Int8Linear.from_linear(getattr(holder, attr)))
    variant = dataclasses.replace(spec, int8_layers=tuple(paths))
    return Servable(
        variant, {**{f"model.{k}": v.detach().clone() for k, v in net.state_dict().items()}, **_stats(tensors)}
    )


def _linears(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An MLP's layers as (weight, bias), in order."""
    n = len(spec.hidden) + 1
    return [(tensors[f"model.{2 * i}.weight"], tensors[f"model.{2 * i}.bias"]) for i in range(n)]


def _pruned(spec: ModelSpec, tensors: dict[str, torch.Tensor], fraction: float) -> Servable:
    if spec.kind != "mlp" or spec.int8_layers:
        raise VariantSkipped(f"structured pruning needs a float MLP, the parent is {spec.kind!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"pruning fraction must be in (0, 1), got {fraction}")
    layers = _linears(spec, tensors)
    keep: list[torch.Tensor] = []
    for i in range(len(spec.hidden)):
        w_in, b_in = layers[i]
        w_out = layers[i + 1][0]
        score = torch.cat([w_in, b_in[:, None]], dim=1).norm(dim=1) * w_out.norm(dim=0)
        k = max(1, round(len(score) * (1 - fraction)))
        # The k largest, in their original order (ties broken by index: deterministic).
        order = sorted(range(len(score)), key=lambda j: (-float(score[j]), j))[:k]
        keep.append(torch.tensor(sorted(order), dtype=torch.long))
    out = _stats(tensors)
    prev: torch.Tensor | None = None
    for i, (w, b) in enumerate(layers):
        rows = keep[i] if i < len(keep) else torch.arange(w.shape[0])
        w2 = w[rows]
        if prev is not None:
            w2 = w2[:, prev]
        out[f"model.{2 * i}.weight"] = w2.clone()
        out[f"model.{2 * i}.bias"] = b[rows].clone()
        prev = rows if i < len(keep) else None
    return Servable(dataclasses.replace(spec, hidden=tuple(len(k) for k in keep)), out)


def _sparse(
    spec: ModelSpec, tensors: dict[str, torch.Tensor], fraction: float
) -> tuple[Servable, dict[str, torch.Tensor]]:
    if spec.int8_layers:
        raise VariantSkipped("the parent is int8: magnitude pruning applies to float weights")
    if not 0 < fraction < 1:
        raise ValueError(f"pruning fraction must be in (0, 1), got {fraction}")
    net = _network(spec, tensors)
    out = _stats(tensors)
    masks: dict[str, torch.Tensor] = {}
    state = net.state_dict()
    linear_weights = {f"{name}.weight" for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    for key, value in state.items():
        value = value.detach().clone()
        if key in linear_weights:
            k = int(value.numel() * fraction)
            if k:
                flat = value.abs().flatten()
                # The k smallest magnitudes (stable order: deterministic on ties).
                idx = torch.sort(flat, stable=True).indices[:k]
                mask = torch.ones(flat.numel(), dtype=torch.bool)
                mask[idx] = False
                mask = mask.reshape(value.shape)
                value = value * mask
                masks[key] = mask
        out[f"model.{key}"] = value
    if not masks:
        raise VariantSkipped("no linear weight to prune")
    return Servable(spec, out), masks


def _finetune(
    parent: Servable,
    variant: Servable,
    recipe: Mapping[str, Any],
    window: Window,
    masks: dict[str, torch.Tensor] | None,
) -> Servable:
    """A short distillation fine-tune of ``variant`` on the window (see the module docstring)."""
    epochs, batch = int(recipe["epochs"]), int(recipe["batch"])
    if epochs <= 0 or len(window) == 0:
        return variant
    teacher = parent.predictor()
    x = teacher.featurizer.standardize(window.raw)
    with torch.no_grad():
        teacher_out = teacher.forward(x)
    regression = parent.spec.task == "regression"
    labels = torch.from_numpy(window.labels).float()
    if regression:
        mean, std = teacher.target.mean_std()
        labels = (labels - mean) / std
    net = _network(variant.spec, variant.tensors)
    opt = torch.optim.Adam(net.parameters(), lr=float(recipe["lr"]))
    generator = torch.Generator().manual_seed(int(recipe["seed"]))
    named = dict(net.named_parameters())
    set_training(net, True)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            loss = distill_loss(
                net(x[idx]),
                teacher_out[idx],
                labels[idx],
                regression=regression,
                alpha=float(recipe["alpha"]),
                temperature=float(recipe["temperature"]),
            ).mean()
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            if masks:
                with torch.no_grad():
                    for key, mask in masks.items():
                        named[key].mul_(mask)
    net.eval()
    tensors = {**_stats(variant.tensors), **{f"model.{k}": v.detach().clone() for k, v in net.state_dict().items()}}
    return Servable(variant.spec, tensors)
