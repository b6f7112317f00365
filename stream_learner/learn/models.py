"""Built-in models (logistic regression, MLP) and user models from a factory.

Every model maps a float32 batch ``[B, n_features]`` to ``[B, n_outputs]``:
class logits for classification (binary is two classes, so one softmax code
path serves both), one value for regression (in standardized target units).

A user model is named ``package.module:function``; the function is called
as ``function(n_features=..., n_outputs=..., **params)`` (``params``:
``trainer_architecture_params``, recorded in the signed architecture) and
must return an ``nn.Module``. ``n_features`` is the width of the dense input
(one column per number, a category's vocabulary or buckets, a vector's
length; :mod:`stream_learner.learn.inputs`).

A spec with a text or a collate hook gives the model a dict of tensors
(:mod:`stream_learner.learn.featurizer`); a factory is then also given
``inputs=[...]`` (each input's :meth:`~stream_learner.learn.inputs.Input.to_dict`)
and, with a hook, ``collate=`` its name. ``logreg`` and ``mlp`` read a text
as the mean of its tokens' embeddings (:class:`TextBag`, ``text_dim``
columns each, 16 unless ``params`` says ``{"text_dim": N}``), next to the
dense columns.

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
from .inputs import Input, is_numeric_only

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
    #: Each feature's declared kind, in ``features`` order (dicts as the signed architecture records them
    #: are read as :class:`Input` s); empty: every feature is a number, as before inputs had kinds.
    inputs: Sequence[Input] = ()
    #: The collate hook (``package.module:function``) that adds tensors of its own; empty: none.
    collate: str = ""

    def __post_init__(self) -> None:
        inputs = tuple(Input.from_dict(i) if isinstance(i, dict) else i for i in self.inputs)
        if not all(isinstance(i, Input) for i in inputs):
            raise ValueError("inputs must be input specs")
        if inputs and [i.name for i in inputs] != list(self.features):
            raise ValueError(f"inputs {[i.name for i in inputs]} are not the features {list(self.features)}")
        # A spec of numbers alone is written as it always was: no inputs.
        object.__setattr__(self, "inputs", () if is_numeric_only(inputs) else inputs)
        if not isinstance(self.params, dict) or not isinstance(self.collate, str):
            raise ValueError("params must be a table (JSON object) and collate a package.module:function")
        if self.collate and ":" not in self.collate:
            raise ValueError(f"the collate hook must be package.module:function, not {self.collate!r}")
        if self.kind in ("logreg", "mlp"):
            if self.collate:
                raise ValueError(
                    "a collate hook's tensors need a user model (trainer_architecture=package.module:function)"
                )
            if set(self.params) - {"text_dim"} or not isinstance(self.params.get("text_dim", 16), int):
                raise ValueError(
                    f"{self.kind} takes no architecture params but text_dim (an integer), got {self.params}"
                )
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
    def n_features(self) -> int:
        """Columns of the dense input: the numbers, the categories' and vectors' widths."""
        return sum(i.width for i in self.inputs) if self.inputs else len(self.features)

    @property
    def tensor_inputs(self) -> bool:
        """True if the model takes a dict of tensors (a text, or a collate hook), not one tensor."""
        return self.collate != "" or any(i.kind == "text" for i in self.inputs)

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
        # Likewise a numeric spec without a hook writes neither (older readers refuse what they lack).
        if self.inputs:
            d["inputs"] = [i.to_dict() for i in self.inputs]
        else:
            del d["inputs"]
        if not self.collate:
            del d["collate"]
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
    n_in, n_out = spec.n_features, spec.n_outputs
    if spec.kind in ("logreg", "mlp"):
        if not spec.tensor_inputs:
            return _head(spec, n_in, n_out)
        texts = [(i.name, i.vocab_size) for i in spec.inputs if i.kind == "text"]
        dim = int(spec.params.get("text_dim", 16))
        return TextBag(texts, dim, _head(spec, n_in + dim * len(texts), n_out))
    module_name, _, func_name = spec.kind.partition(":")
    factory = getattr(importlib.import_module(module_name), func_name)
    extra: dict[str, Any] = {}
    if spec.tensor_inputs:
        extra["inputs"] = [i.to_dict() for i in spec.inputs] or [{"name": n, "kind": "numeric"} for n in spec.features]
        if spec.collate:
            extra["collate"] = spec.collate
    model = factory(n_features=n_in, n_outputs=n_out, **extra, **spec.params)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec.kind} returned {type(model).__name__}, not an nn.Module")
    return model


def _head(spec: ModelSpec, n_in: int, n_out: int) -> nn.Module:
    if spec.kind == "logreg":
        return nn.Linear(n_in, n_out)
    layers: list[nn.Module] = []
    width = n_in
    for h in spec.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class TextBag(nn.Module):
    """A built-in model's reading of texts: per text, the mean of its tokens' embeddings (padding,
    id 0, left out), next to the dense columns, into ``head`` (the logreg or MLP).

    >>> bag = TextBag([("review", 10)], 4, nn.Linear(2 + 4, 3))
    >>> x = {"dense": torch.zeros(2, 2), "text:review": torch.tensor([[3, 5, 0], [0, 0, 0]])}
    >>> bag(x).shape
    torch.Size([2, 3])
    """

    def __init__(self, texts: Sequence[tuple[str, int]], dim: int, head: nn.Module) -> None:
        super().__init__()
        self.names = [name for name, _ in texts]
        # vocab_size + 1 rows: the featurizer gives token id + 1, 0 is padding.
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(size + 1, dim, mode="mean", padding_idx=0) for _, size in texts)
        self.head = head

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's output for the dense columns and each text's mean embedding."""
        parts = [x["dense"]]
        parts += [bag(x[f"text:{name}"]) for name, bag in zip(self.names, self.embeddings)]
        out: torch.Tensor = self.head(torch.cat(parts, dim=1))
        return out


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
