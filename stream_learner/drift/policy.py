"""The drift policy: which typed actions a finding calls for, in the order to carry them out.

:class:`DriftPolicy` is pure decision logic; the trainer (and replay) carry
the actions out. Its defaults are the settings' defaults
(``trainer_drift_*`` in :class:`~stream_learner.config.Settings`), read from
the settings' fields so that the two cannot drift apart.

>>> from stream_learner.config import Settings
>>> DriftPolicy().lr_boost_steps == Settings().trainer_drift_lr_boost_batches
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar, Literal, TypeAlias, TypeVar

import msgspec

from ..config import Settings
from .detectors import Signal
from .monitor import DriftFinding

#: What a drift can trigger (besides the alert every finding gets): the values of ``on_drift``.
DriftActionName: TypeAlias = Literal["promote_challenger_if_better", "optimizer_reset", "lr_boost", "checkpoint"]


@dataclasses.dataclass(frozen=True)
class Alert:
    """Publish a ``drift.v1`` event for the finding (every finding gets one)."""

    kind: ClassVar[Literal["alert"]] = "alert"


@dataclasses.dataclass(frozen=True)
class StartChallenger:
    """Start training a challenger model next to the champion."""

    kind: ClassVar[Literal["start_challenger"]] = "start_challenger"


@dataclasses.dataclass(frozen=True)
class PromoteChallengerIfBetter:
    """Replace the champion by the running challenger if its recent metrics are better."""

    kind: ClassVar[Literal["promote_challenger_if_better"]] = "promote_challenger_if_better"


@dataclasses.dataclass(frozen=True)
class OptimizerReset:
    """Drop the optimizer's state (moments fitted to the old concept)."""

    kind: ClassVar[Literal["optimizer_reset"]] = "optimizer_reset"


@dataclasses.dataclass(frozen=True)
class LrBoost:
    """Multiply the learning rate by ``factor`` for the next ``steps`` optimizer steps, then restore it."""

    factor: float
    steps: int
    kind: ClassVar[Literal["lr_boost"]] = "lr_boost"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Take and publish a checkpoint now, outside the regular cadence (after the actions before it)."""

    kind: ClassVar[Literal["checkpoint"]] = "checkpoint"


Action: TypeAlias = Alert | StartChallenger | PromoteChallengerIfBetter | OptimizerReset | LrBoost | Checkpoint

# Execution order: swap in the better model, give its optimizer a fresh start and a boost,
# then publish the result (the pre-drift model is already the parent checkpoint).
_DRIFT_ORDER: tuple[DriftActionName, ...] = (
    "promote_challenger_if_better",
    "optimizer_reset",
    "lr_boost",
    "checkpoint",
)

T = TypeVar("T")


def _setting_default(name: str, kind: type[T]) -> T:
    """The default of setting ``name``: the settings are the one source of the policy's defaults."""
    field = next(f for f in msgspec.structs.fields(Settings) if f.name == name)
    value = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    if not isinstance(value, kind):
        raise TypeError(f"the default of setting {name} is a {type(value).__name__}, not a {kind.__name__}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class DriftPolicy:
    """Pure decision logic: which actions a finding calls for, in the order to carry them out.

    Every finding gets an :class:`Alert`. A warning also starts a challenger
    if ``challenger_on_warning`` and none is running. A drift adds, among
    ``on_drift`` (kept as a tuple) and always in this order:
    :class:`PromoteChallengerIfBetter` (only while a challenger runs),
    :class:`OptimizerReset`, :class:`LrBoost` (``lr_boost_factor`` for
    ``lr_boost_steps`` optimizer steps) and a forced :class:`Checkpoint`.
    Actions are hashable, so a trainer that got several findings for one
    example can merge them with ``dict.fromkeys``.

    The defaults are those of the settings ``trainer_drift_challenger_on_warning``,
    ``trainer_drift_on_drift``, ``trainer_drift_lr_boost_factor`` and
    ``trainer_drift_lr_boost_batches``.

    >>> policy = DriftPolicy(on_drift=["lr_boost"], lr_boost_factor=3.0, lr_boost_steps=200)
    >>> policy.decide(DriftFinding("adwin_error", "error", Signal.DRIFT, 1.0, 2047))
    [Alert(), LrBoost(factor=3.0, steps=200)]
    >>> DriftPolicy()
    DriftPolicy(challenger_on_warning=False, on_drift=('promote_challenger_if_better', 'lr_boost', 'checkpoint'), \
lr_boost_factor=2.0, lr_boost_steps=100)
    """

    challenger_on_warning: bool = _setting_default("trainer_drift_challenger_on_warning", bool)
    on_drift: Sequence[str] = tuple(_setting_default("trainer_drift_on_drift", list))
    lr_boost_factor: float = _setting_default("trainer_drift_lr_boost_factor", float)
    lr_boost_steps: int = _setting_default("trainer_drift_lr_boost_batches", int)

    def __post_init__(self) -> None:
        on_drift = tuple(self.on_drift)
        object.__setattr__(self, "on_drift", on_drift)  # a tuple: the policy stays hashable and comparable
        unknown = set(on_drift) - set(_DRIFT_ORDER)
        if unknown:
            raise ValueError(f"unknown drift actions {sorted(unknown)}; choose among {list(_DRIFT_ORDER)}")
        if not self.lr_boost_factor > 1.0 or self.lr_boost_steps < 1:
            raise ValueError("lr_boost_factor must be > 1 and lr_boost_steps >= 1")

    def decide(self, finding: DriftFinding, *, challenger_active: bool = False) -> list[Action]:
        """The actions for ``finding``; ``challenger_active`` says whether a challenger is training now."""
        actions: list[Action] = [Alert()]
        if finding.kind == Signal.WARNING:
            if self.challenger_on_warning and not challenger_active:
                actions.append(StartChallenger())
            return actions
        for name in _DRIFT_ORDER:
            if name not in self.on_drift:
                continue
            if name == "promote_challenger_if_better":
                if challenger_active:
                    actions.append(PromoteChallengerIfBetter())
            elif name == "optimizer_reset":
                actions.append(OptimizerReset())
            elif name == "lr_boost":
                actions.append(LrBoost(self.lr_boost_factor, self.lr_boost_steps))
            else:
                actions.append(Checkpoint())
        return actions
