"""A frozen pretrained base, what learns on top of it, LoRA adapters, precision and device.

**The base** (``trainer_base_weights``, ``serving_base_weights``) is a local
safetensors file of tensors named as the model's ``state_dict`` keys (a
subset of them). :func:`load_base` reads it once, hashes exactly the bytes
it decodes (so the digest names what was loaded, whatever happens to the
file afterwards) and casts its floating tensors to float32: the trainer's
own state is float32 whatever precision the file or the published
checkpoints use. Its SHA-256 goes into every manifest of the model.

**What learns** (``trainer_trainable``): ``all`` (every parameter; the base,
if any, is only the starting point), ``head`` (the parameters of the named
modules, ``trainer_head_modules``) or ``lora`` (low-rank adapters on the
named ``nn.Linear`` layers, ``trainer_lora_layers``, plus the head modules
if any). Everything else is *frozen*: ``requires_grad`` off, no optimizer
state, never saved in the trainer's state (it is the base's, which the
state names by digest), never published in a delta. Every frozen parameter
must come from the base: a value the trainer drew at random could not be
rebuilt by a serving node.

**LoRA** is :class:`LoRALinear`, a small implementation rather than the
PEFT library: an ``nn.Linear`` subclass that keeps the layer's own
``weight`` and ``bias`` (so the base file's names are the plain model's)
and adds ``lora_A`` (``rank x in``, Kaiming-uniform from the model's seed)
and ``lora_B`` (``out x rank``, zeros: a fresh adapter changes nothing), the
output ``x W^T + b + (x A^T) B^T * alpha / rank``. Its whole state is four
named tensors in the model's ``state_dict``, so saving, restoring and
publishing it is the same exact, pickle-free path as every other tensor;
PEFT wraps the model (renaming every key under ``base_model.model``), would
pull in ``transformers`` and ``accelerate``, and its adapter save format is
one more thing to keep bit-exact. The adapters are not merged into the
weights on the serving side: a node computes what the learner computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..checkpoint.codec import decode_tensors
from ..checkpoint.digest import sha256_hex
from ..errors import ConfigError

__all__ = [
    "DTYPES",
    "BaseWeights",
    "Dtype",
    "LoRALinear",
    "add_lora",
    "check_device",
    "frozen_names",
    "load_base",
]

#: A precision a checkpoint may be published in (``trainer_checkpoint_dtype``).
Dtype = Literal["float32", "float16", "bfloat16"]
#: The torch dtype of each.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank adapter (see the module docstring)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, device: torch.device | None
    ) -> None:
        # The full-size weight is made on the meta device (no memory, no random draw): the caller
        # puts the replaced layer's own parameters in its place.
        super().__init__(in_features, out_features, bias, device="meta")
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(x, self.weight, self.bias)
        return base + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora rank={self.rank}, alpha={self.alpha:g}"


def add_lora(model: nn.Module, layers: Sequence[str], rank: int, alpha: float) -> nn.Module:
    """Replace the ``nn.Linear`` layers named by ``layers`` with :class:`LoRALinear` holding their parameters.

    ``lora_A`` is drawn from torch's global generator, which the model builder has seeded (so the
    same spec gives the same adapters); on the meta device nothing is drawn. Raises
    ``ValueError`` for a path that is not an ``nn.Linear`` (or is one already adapted).
    """
    if rank < 1:
        raise ValueError(f"lora rank must be at least 1, got {rank}")
    for path in layers:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            raise ValueError(f"lora layer {path!r} is not a module of the architecture") from None
        layer = getattr(parent, name, None)
        if not isinstance(layer, nn.Linear) or isinstance(layer, LoRALinear):
            raise ValueError(f"lora layer {path!r} is not an nn.Linear of the architecture")
        adapted = LoRALinear(
            layer.in_features, layer.out_features, layer.bias is not None, rank, alpha, layer.weight.device
        )
        adapted.weight = layer.weight
        adapted.bias = layer.bias
        if not adapted.lora_A.is_meta:
            with torch.no_grad():
                nn.init.kaiming_uniform_(adapted.lora_A, a=math.sqrt(5))
        setattr(parent, name, adapted)
    return model


@dataclass(frozen=True, eq=False)
class BaseWeights:
    """A base file as loaded: its path, the SHA-256 of its bytes, its tensors (floating ones in float32)."""

    path: str
    sha256: str
    size: int
    tensors: Mapping[str, torch.Tensor] = field(repr=False)

    def to(self, device: torch.device) -> BaseWeights:
        """The same base with its tensors on ``device`` (itself if they are there)."""
        if all(t.device == device for t in self.tensors.values()):
            return self
        return BaseWeights(self.path, self.sha256, self.size, {k: v.to(device) for k, v in self.tensors.items()})


def load_base(path: str | Path, *, what: str = "trainer_base_weights") -> BaseWeights:
    """Read a base file: hash the bytes read, decode the same bytes (never pickle), cast to float32.

    Raises :class:`ConfigError` naming ``what`` if it cannot be read or is not safetensors.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(path)!r}: {exc}") from None
    try:
        tensors, _ = decode_tensors(data)
    except Exception as exc:  # noqa: BLE001 - a base that does not decode is a setting to fix
        raise ConfigError(f"{what}: {str(path)!r} is not a safetensors file: {exc}") from None
    as32 = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return BaseWeights(str(path), sha256_hex(data), len(data), as32)


def _under(name: str, modules: Iterable[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def frozen_names(model: nn.Module, trainable: str, head: Sequence[str]) -> set[str]:
    """The parameters of ``model`` that do not learn under ``trainable`` (``all``, ``head``, ``lora``).

    Raises ``ValueError`` for a head module the model does not have, or ``head`` with no module.
    """
    names = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    if missing := [m for m in head if m not in modules]:
        raise ValueError(f"head modules {missing} are not modules of the architecture")
    if trainable == "all":
        return set()
    if trainable == "head":
        if not head:
            raise ValueError("trainer_trainable=head needs trainer_head_modules (the modules that learn)")
        return {n for n in names if not _under(n, head)}
    if trainable == "lora":
        lora = {n for n in names if n.rpartition(".")[2] in ("lora_A", "lora_B")}
        if not lora:
            raise ValueError("trainer_trainable=lora needs trainer_lora_layers (the linear layers to adapt)")
        return {n for n in names if n not in lora and not _under(n, head)}
    raise ValueError(f"trainer_trainable must be all, head or lora, not {trainable!r}")


def apply_base(model: nn.Module, base: BaseWeights, frozen: set[str], *, share: bool) -> None:
    """Put the base's values into ``model``: frozen parameters become the base's own tensors when
    ``share`` (several models, one copy: nothing ever writes them), every other named tensor is copied.

    Raises ``ValueError`` for a base tensor the model does not have or of another shape, and for a
    frozen parameter the base lacks.
    """
    state = model.state_dict()
    if extra := sorted(set(base.tensors) - set(state)):
        raise ValueError(f"the base has tensors the architecture lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if lacking := sorted(frozen - set(base.tensors)):
        raise ValueError(
            f"frozen parameters {lacking[:5]}{' ...' if len(lacking) > 5 else ''} are not in the base: "
            "a frozen value must come from the base (or let them learn)"
        )
    for name, tensor in base.tensors.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(
                f"base tensor {name} has shape {list(tensor.shape)}, the architecture {list(state[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in base.tensors.items():
            if name in frozen and share:
                module_path, _, attr = name.rpartition(".")
                module = model.get_submodule(module_path) if module_path else model
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                state[name].copy_(tensor)


def check_device(name: str, *, what: str) -> torch.device:
    """The torch device ``name`` (``cpu``, ``cuda``, ``cuda:N``) if this machine has it, else a
    :class:`ConfigError` at start (never a crash mid-stream)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{what}={name!r} is not a torch device: {exc}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"{what}={name!r}: only cpu, cuda and cuda:N are supported")
    if not torch.cuda.is_available():
        raise ConfigError(f"{what}={name!r}, but this machine has no CUDA device (torch sees none): use cpu")
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else 0
    if index >= count:
        raise ConfigError(f"{what}={name!r}, but this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)
