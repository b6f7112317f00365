"""A model with its optimizer and its last good state (for the spike guard's rollback).

The state is saved as flat tensors plus JSON-able meta, never pickle:
``<name>.model.<param>``, ``<name>.optimizer.<idx>.<key>`` and, once a step
was taken, ``<name>.good.*`` the same for the last good state.

With a frozen base (:mod:`~stream_learner.learn.frozen`) the frozen
parameters are the base's tensors, shared by every model built on it; they
have no optimizer state and are in neither the saved state nor the good
state: only what learns (and the buffers) is, and the state names the base
by its digest (``<name>.base``), so a restart on another base is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .frozen import BaseWeights, apply_base, frozen_names
from .models import ModelSpec, build_model
from .parts import Tensors

OptimizerState = dict[str, Any]


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer named in the settings (``adam``, ``adamw`` or ``sgd``).

    Adam and AdamW use torch's fused kernel (one call per parameter instead of about ten
    small ops): 27 against 71 us per step for the default MLP on CPU. Its rounding differs
    from the per-op version in the last bits, and it is deterministic, so a restored trainer
    still ends bit-identical to one that never stopped.
    """
    params = list(params)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
        return cls(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use adam, adamw or sgd")


_SCALARS = frozenset({int, float, bool, str, type(None)})


def _immutable(value: Any) -> bool:
    return type(value) in _SCALARS or (type(value) is tuple and all(type(v) in _SCALARS for v in value))


def _copy_group(group: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of an optimizer param group, cheaper when its values are immutable (they are for
    torch's optimizers: floats, bools, tuples of floats, None; ``params`` is a list of ints)."""
    if all(_immutable(v) for k, v in group.items() if k != "params"):
        return {**group, "params": list(group["params"])}
    return copy.deepcopy(group)


class Trainable:
    """A freshly built model of ``spec``, its optimizer, and the last good state.

    With ``base``, the base's values are put in (see :func:`~stream_learner.learn.frozen.apply_base`)
    and the parameters ``trainable`` leaves out are frozen; the model is then moved to ``device``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        optimizer: str,
        lr: float,
        weight_decay: float,
        *,
        base: BaseWeights | None = None,
        trainable: str = "all",
        head: tuple[str, ...] = (),
        device: torch.device | None = None,
    ) -> None:
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.device = device or torch.device("cpu")
        model = build_model(spec)
        self.frozen: frozenset[str] = frozenset(frozen_names(model, trainable, head))
        self.base_sha256 = base.sha256 if base is not None else None
        if base is not None:
            apply_base(model, base.to(self.device), set(self.frozen), share=True)
        elif self.frozen:
            raise ValueError(f"trainer_trainable={trainable} freezes parameters: it needs trainer_base_weights")
        for name, param in model.named_parameters():
            param.requires_grad_(name not in self.frozen)
        self.model: nn.Module = model.to(self.device)
        self.optimizer = make_optimizer(optimizer, self.learning(), lr, weight_decay)
        self.good: tuple[dict[str, torch.Tensor], OptimizerState] | None = None

    def learning(self) -> list[nn.Parameter]:
        """The parameters that learn (all of them without a frozen base), in the model's order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def own_state(self) -> dict[str, torch.Tensor]:
        """The model's state without the frozen parameters: what is saved, restored and rolled back."""
        frozen = self.frozen
        return {k: v for k, v in self.model.state_dict().items() if k not in frozen}

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """The frozen parameters (the base's values), by name."""
        frozen = self.frozen
        return {k: v for k, v in self.model.state_dict().items() if k in frozen}

    def reset_optimizer(self) -> None:
        """A fresh optimizer on the same weights (its moments forgotten)."""
        self.optimizer = make_optimizer(self.optimizer_name, self.learning(), self.lr, self.weight_decay)

    def remember_good(self) -> None:
        """Keep the current model and optimizer state as the one to roll back to."""
        current = self.optimizer.state_dict()
        good = self.good
        if good is None or good[1]["state"].keys() != current["state"].keys():
            self.good = (copy.deepcopy(self.own_state()), copy.deepcopy(current))
            return
        # Copy into the tensors kept last time, in one foreach call: a deep copy per step cost
        # ~30% of training time, a copy_ per tensor ~3 us each.
        dst, src = [], []
        for key, value in self.own_state().items():
            dst.append(good[0][key])
            src.append(value)
        for idx, per_param in current["state"].items():
            kept = good[1]["state"][idx]
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    dst.append(kept[key])
                    src.append(value)
                else:
                    kept[key] = value
        with torch.no_grad():
            torch._foreach_copy_(dst, src)
        good[1]["param_groups"] = [_copy_group(g) for g in current["param_groups"]]

    def rollback(self) -> bool:
        """Go back to the last good state; False if there is none yet."""
        if self.good is None:
            return False
        # The learning rate is policy (a drift's boost), not state to roll back.
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._load_own(self.good[0])
        self.optimizer.load_state_dict(copy.deepcopy(self.good[1]))
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return True

    def _load_own(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the model's own state (everything but the frozen parameters), strictly."""
        result = self.model.load_state_dict(dict(state), strict=False)
        if result.unexpected_keys or set(result.missing_keys) != self.frozen:
            raise ValueError(
                f"the saved model state does not fit: unexpected {sorted(result.unexpected_keys)[:5]}, "
                f"missing {sorted(set(result.missing_keys) - self.frozen)[:5]}"
            )

    def save(self, tensors: Tensors, meta: dict[str, Any], name: str) -> None:
        """Write this trainable's state under ``name`` (tensors cloned: later steps do not change them)."""
        state = self.own_state()
        for key, value in state.items():
            tensors[f"{name}.model.{key}"] = value.detach().clone()
        meta[f"{name}.model"] = sorted(state)
        if self.base_sha256 is not None:
            meta[f"{name}.base"] = self.base_sha256
        meta[f"{name}.optimizer"] = _put_optimizer(tensors, f"{name}.optimizer", self.optimizer.state_dict())
        if self.good is not None:
            for key, value in self.good[0].items():
                tensors[f"{name}.good.model.{key}"] = value.detach().clone()
            meta[f"{name}.good.optimizer"] = _put_optimizer(tensors, f"{name}.good.optimizer", self.good[1])

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], name: str) -> None:
        """Restore what :meth:`save` wrote under ``name``."""
        saved_base = meta.get(f"{name}.base")
        if saved_base != self.base_sha256:
            raise ValueError(
                f"the saved state was learned on base {saved_base or '(none)'}, the settings give "
                f"{self.base_sha256 or '(none)'} (trainer_base_weights): the same base is needed to go on"
            )
        keys = meta[f"{name}.model"]
        self._load_own({key: tensors[f"{name}.model.{key}"] for key in keys})
        self.optimizer.load_state_dict(_get_optimizer(tensors, f"{name}.optimizer", meta[f"{name}.optimizer"]))
        if f"{name}.good.optimizer" in meta:
            self.good = (
                {key: tensors[f"{name}.good.model.{key}"].to(self.device, copy=True) for key in keys},
                _get_optimizer(tensors, f"{name}.good.optimizer", meta[f"{name}.good.optimizer"]),
            )


def _put_optimizer(tensors: Tensors, prefix: str, state: OptimizerState) -> dict[str, Any]:
    """Flatten an optimizer state_dict: tensors by name, the rest JSON-able."""
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return {
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "tensor_keys": sorted(
            f"{idx}.{k}" for idx, p in state["state"].items() for k, v in p.items() if isinstance(v, torch.Tensor)
        ),
    }


def _get_optimizer(tensors: Mapping[str, torch.Tensor], prefix: str, meta: Mapping[str, Any]) -> OptimizerState:
    state: dict[int, dict[str, Any]] = {}
    for name in meta["tensor_keys"]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = tensors[f"{prefix}.{name}"].clone()
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}
