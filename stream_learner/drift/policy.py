"""The drift policy: which typed actions a finding calls for."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeAlias

import msgspec

from .config import DriftConfig, PolicyConfig, load_drift_config
from .detectors import Signal
from .monitor import DriftFinding


@dataclasses.dataclass(frozen=True)
class Alert:
    """Publish a ``drift.v1`` event for the finding (every finding gets one)."""

    kind: ClassVar[str] = "alert"


@dataclasses.dataclass(frozen=True)
class StartChallenger:
    """Start training a challenger model next to the champion."""

    kind: ClassVar[str] = "start_challenger"


@dataclasses.dataclass(frozen=True)
class PromoteChallengerIfBetter:
    """Replace the champion by the running challenger if its recent metrics are better."""

    kind: ClassVar[str] = "promote_challenger_if_better"


@dataclasses.dataclass(frozen=True)
class OptimizerReset:
    """Drop the optimizer's state (moments fitted to the old concept)."""

    kind: ClassVar[str] = "optimizer_reset"


@dataclasses.dataclass(frozen=True)
class LrBoost:
    """Multiply the learning rate by ``factor`` for the next ``steps`` optimizer steps, then restore it."""

    factor: float
    steps: int
    kind: ClassVar[str] = "lr_boost"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Take and publish a checkpoint now, outside the regular cadence (after the actions before it)."""

    kind: ClassVar[str] = "checkpoint"


Action: TypeAlias = Alert | StartChallenger | PromoteChallengerIfBetter | OptimizerReset | LrBoost | Checkpoint

# Execution order: swap in the better model, give its optimizer a fresh start and a boost,
# then publish the result (the pre-drift model is already the parent checkpoint).
_DRIFT_ORDER: tuple[str, ...] = ("promote_challenger_if_better", "optimizer_reset", "lr_boost", "checkpoint")


class DriftPolicy:
    """Pure decision logic: which actions a finding calls for, in the order to carry them out.

    Every finding gets an :class:`Alert`. A warning also starts a challenger
    if ``challenger_on_warning`` and none is running. A drift adds, among
    ``on_drift`` and always in this order: :class:`PromoteChallengerIfBetter`
    (only while a challenger runs), :class:`OptimizerReset`,
    :class:`LrBoost` (``lr_boost_factor`` for ``lr_boost_steps`` steps) and
    a forced :class:`Checkpoint`. Actions are hashable, so a trainer that got
    several findings for one example can merge them with ``dict.fromkeys``.

    >>> policy = DriftPolicy(on_drift=["lr_boost"], lr_boost_factor=3.0, lr_boost_steps=200)
    >>> policy.decide(DriftFinding("adwin_error", "error", Signal.DRIFT, 1.0, 2047))
    [Alert(), LrBoost(factor=3.0, steps=200)]
    """

    def __init__(
        self,
        *,
        challenger_on_warning: bool = False,
        on_drift: Iterable[str] = ("promote_challenger_if_better", "lr_boost", "checkpoint"),
        lr_boost_factor: float = 2.0,
        lr_boost_steps: int = 1000,
    ) -> None:
        on_drift = tuple(on_drift)
        unknown = set(on_drift) - set(_DRIFT_ORDER)
        if unknown:
            raise ValueError(f"unknown drift actions {sorted(unknown)}; choose among {list(_DRIFT_ORDER)}")
        if not lr_boost_factor > 1.0 or lr_boost_steps < 1:
            raise ValueError("lr_boost_factor must be > 1 and lr_boost_steps >= 1")
        self.challenger_on_warning = challenger_on_warning
        self.on_drift = on_drift
        self.lr_boost_factor = lr_boost_factor
        self.lr_boost_steps = lr_boost_steps

    @classmethod
    def from_config(cls, config: DriftConfig | PolicyConfig | Mapping[str, Any] | None = None) -> DriftPolicy:
        """The policy of a :class:`DriftConfig` or :class:`PolicyConfig` (a mapping: of a ``DriftConfig``)."""
        if config is None:
            config = PolicyConfig()
        elif isinstance(config, Mapping):
            config = load_drift_config(config)
        if isinstance(config, DriftConfig):
            config = config.policy
        return cls(**msgspec.structs.asdict(config))

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

