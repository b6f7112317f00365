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
import torch.optim.optimizer as torch_optimizer
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
        # Which parameters learn is fixed here (requires_grad is set once): the list is kept.
        self._learning = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(optimizer, self.learning(), lr, weight_decay)
        self.good: tuple[dict[str, torch.Tensor], OptimizerState] | None = None
        # remember_good's copy plan, valid while the optimizer and its state tensors are these ones.
        self._good_plan: _GoodPlan | None = None

    def learning(self) -> list[nn.Parameter]:
        """The parameters that learn (all of them without a frozen base), in the model's order."""
        return list(self._learning)

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
        self._good_plan = None

    def remember_good(self) -> None:
        """Keep the current model and optimizer state as the one to roll back to."""
        optimizer = self.optimizer
        plan = self._good_plan
        if plan is not None and plan.optimizer is optimizer and plan.states == len(optimizer.state):
            # The same tensors as last time (in-place updates only): copy without building a
            # state_dict of the model and of the optimizer first (35 against 9 us per step).
            plan.copy(optimizer)
            return
        current = optimizer.state_dict()
        good = self.good
        if good is None or good[1]["state"].keys() != current["state"].keys():
            self.good = (copy.deepcopy(self.own_state()), copy.deepcopy(current))
            self._good_plan = None
            return
        # Copy into the tensors kept last time, in one foreach call: a deep copy per step cost
        # ~30% of training time, a copy_ per tensor ~3 us each.
        plan = _GoodPlan.build(self, good, current)
        plan.copy(optimizer)
        self._good_plan = plan

    def step_optimizer(self) -> None:
        """``optimizer.step()``; for torch's fused Adam or AdamW, its kernel called directly.

        The same kernel with the same arguments as ``Adam.step`` gives it (so the same bits), without
        the ~60 us of Python around it per step at the default batch (hooks, profiler records,
        grouping by device). Anything else (another optimizer, hooks registered, a parameter's
        first step, several devices or dtypes) takes ``optimizer.step()``.
        """
        args = _fused_adam_args(self.optimizer)
        if args is None:
            self.optimizer.step()
            return
        params, grads, exp_avgs, exp_avg_sqs, steps, kernel, options = args
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, grad_scale=None, found_inf=None, **options)

    def rollback(self) -> bool:
        """Go back to the last good state; False if there is none yet."""
        if self.good is None:
            return False
        # The learning rate is policy (a drift's boost), not state to roll back.
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._load_own(self.good[0])
        self.optimizer.load_state_dict(copy.deepcopy(self.good[1]))
        self._good_plan = None  # the optimizer holds new state tensors
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
        self._good_plan = None
        self._load_own({key: tensors[f"{name}.model.{key}"] for key in keys})
        self.optimizer.load_state_dict(_get_optimizer(tensors, f"{name}.optimizer", meta[f"{name}.optimizer"]))
        if f"{name}.good.optimizer" in meta:
            self.good = (
                {key: tensors[f"{name}.good.model.{key}"].to(self.device, copy=True) for key in keys},
                _get_optimizer(tensors, f"{name}.good.optimizer", meta[f"{name}.good.optimizer"]),
            )


class _GoodPlan:
    """What :meth:`Trainable.remember_good` copies: the current tensors (the model's own state and
    the optimizer's state tensors) into the good state's, and the optimizer's non-tensor state.

    Valid while the optimizer is the same object holding state for as many parameters: its
    tensors are updated in place, and whatever replaces them (a rollback, a load, a fresh
    optimizer) drops the plan, as does a parameter's first step (a new state entry).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        dst: list[torch.Tensor],
        src: list[torch.Tensor],
        scalars: list[tuple[dict[str, Any], str, dict[str, Any]]],
        good_optimizer: OptimizerState,
    ) -> None:
        self.optimizer = optimizer
        self.states = len(optimizer.state)
        self.dst, self.src, self.scalars, self.good_optimizer = dst, src, scalars, good_optimizer
        # state_dict's param_groups number the parameters across the groups, in order.
        self.group_ids: list[list[int]] = []
        at = 0
        for group in optimizer.param_groups:
            self.group_ids.append(list(range(at, at + len(group["params"]))))
            at += len(group["params"])

    @classmethod
    def build(
        cls, t: Trainable, good: tuple[dict[str, torch.Tensor], OptimizerState], current: OptimizerState
    ) -> _GoodPlan:
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        scalars: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
        # keep_vars: the parameters and buffers themselves, not detached views made anew per call.
        own = {k: v for k, v in t.model.state_dict(keep_vars=True).items() if k not in t.frozen}
        for key, value in own.items():
            dst.append(good[0][key])
            src.append(value)
        # state_dict numbers the parameters in param_groups order, as optimizer.state is keyed by them.
        params = [p for group in t.optimizer.param_groups for p in group["params"]]
        for idx, per_param in current["state"].items():
            kept = good[1]["state"][idx]
            live = t.optimizer.state[params[idx]]
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    dst.append(kept[key])
                    src.append(value)
                else:
                    scalars.append((kept, key, live))
        return cls(t.optimizer, dst, src, scalars, good[1])

    def copy(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy the current state into the good state (one foreach call for the tensors)."""
        with torch.no_grad():
            torch._foreach_copy_(self.dst, self.src)
        for kept, key, live in self.scalars:
            kept[key] = live[key]
        groups = []
        for group, ids in zip(optimizer.param_groups, self.group_ids, strict=True):
            packed = {k: v for k, v in group.items() if k != "params"}  # as state_dict packs a group
            if not all(_immutable(v) for v in packed.values()):
                packed = copy.deepcopy(packed)
            packed["params"] = list(ids)
            groups.append(packed)
        self.good_optimizer["param_groups"] = groups


def _fused_adam_args(optimizer: torch.optim.Optimizer) -> tuple[Any, ...] | None:
    """The arguments ``Adam.step`` would pass its fused kernel, or ``None`` where a direct call
    would not do exactly what ``step()`` does."""
    kind = type(optimizer)
    if kind is not torch.optim.Adam and kind is not torch.optim.AdamW:
        return None
    if (
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or torch_optimizer._global_optimizer_pre_hooks
        or torch_optimizer._global_optimizer_post_hooks
        or len(optimizer.param_groups) != 1
    ):
        return None
    group = optimizer.param_groups[0]
    if (
        not group.get("fused")
        or group.get("amsgrad")
        or group.get("capturable")
        or group.get("differentiable")
        or isinstance(group["lr"], torch.Tensor)
        or getattr(optimizer, "grad_scale", None) is not None
        or getattr(optimizer, "found_inf", None) is not None
    ):
        return None
    params: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    exp_avgs: list[torch.Tensor] = []
    exp_avg_sqs: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    state = optimizer.state
    first = None
    for p in group["params"]:
        grad = p.grad
        if grad is None:
            continue
        per = state.get(p)
        if not per or grad.is_sparse or p.is_complex():
            return None  # a first step initializes the state: step() does that
        if first is None:
            first = (p.device, p.dtype)
        elif (p.device, p.dtype) != first:
            return None  # step() groups by device and dtype
        params.append(p)
        grads.append(grad)
        exp_avgs.append(per["exp_avg"])
        exp_avg_sqs.append(per["exp_avg_sq"])
        steps.append(per["step"])
    if not params:
        return None
    beta1, beta2 = group["betas"]
    if isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor):
        return None
    kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
    options = {
        "amsgrad": False,
        "lr": group["lr"],
        "beta1": beta1,
        "beta2": beta2,
        "weight_decay": group["weight_decay"],
        "eps": group["eps"],
        "maximize": group["maximize"],
    }
    return params, grads, exp_avgs, exp_avg_sqs, steps, kernel, options


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
