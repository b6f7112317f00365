"""Drift configuration (detectors and policy as TOML tables)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ..errors import ConfigError
from .detectors import _KINDS, _SIGNAL_RE, Detector

Name = Annotated[str, Meta(min_length=1, max_length=256)]
SignalName = Annotated[str, Meta(pattern=_SIGNAL_RE.pattern)]
DriftActionName = Literal["lr_boost", "optimizer_reset", "promote_challenger_if_better", "checkpoint"]


class DetectorConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One detector: its unique name, kind (``adwin`` or ``page_hinkley``), signal and parameters."""

    name: Name
    kind: Literal["adwin", "page_hinkley"]
    signal: SignalName
    params: dict[str, float | int | str | bool | None] = {}


class PolicyConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What :class:`DriftPolicy` does on a warning and on a drift; see its docstring."""

    challenger_on_warning: bool = False
    on_drift: tuple[DriftActionName, ...] = ("promote_challenger_if_better", "lr_boost", "checkpoint")
    lr_boost_factor: Annotated[float, Meta(gt=1.0)] = 2.0
    lr_boost_steps: Annotated[int, Meta(ge=1)] = 1000


def _default_detectors() -> list[DetectorConfig]:
    return [
        DetectorConfig(name="adwin_error", kind="adwin", signal="error"),
        DetectorConfig(name="page_hinkley_loss", kind="page_hinkley", signal="loss"),
        # Label-free: the model's confidence moves as soon as its inputs do, long before labels arrive.
        DetectorConfig(name="adwin_confidence", kind="adwin", signal="confidence"),
    ]


class DriftConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The trainer's drift settings: detectors (ADWIN on error and confidence, Page-Hinkley on loss by default) and the policy.

    As a TOML table::

        [drift.policy]
        challenger_on_warning = true
        on_drift = ["promote_challenger_if_better", "optimizer_reset", "lr_boost", "checkpoint"]

        [[drift.detectors]]
        name = "adwin_error"
        kind = "adwin"
        signal = "error"
        params = { delta = 0.002, warning_delta = 0.02 }
    """

    detectors: list[DetectorConfig] = msgspec.field(default_factory=_default_detectors)
    policy: PolicyConfig = PolicyConfig()

    def __post_init__(self) -> None:
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be unique, got {names}")


def load_drift_config(data: Mapping[str, Any]) -> DriftConfig:
    """Validate a mapping (a parsed TOML ``[drift]`` table) into a :class:`DriftConfig`.

    Raises :class:`~stream_learner.errors.ConfigError` naming the bad field,
    and for an unknown or invalid detector parameter.

    >>> load_drift_config({"detectors": [{"name": "e", "kind": "adwin", "signal": "errors"}]})
    Traceback (most recent call last):
    ...
    stream_learner.errors.ConfigError: invalid drift setting: Expected `str` matching regex '^(error|loss|confidence|feature:.+)$' - at `$.detectors[0].signal`
    """
    try:
        config = msgspec.convert(dict(data), DriftConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid drift setting: {exc}") from None
    for spec in config.detectors:
        build_detector(spec)  # unknown or invalid parameters fail here, at start
    return config


def build_detector(spec: DetectorConfig) -> Detector:
    """Build the detector a :class:`DetectorConfig` describes; ``ConfigError`` if its parameters are wrong."""
    cls = _KINDS[spec.kind]
    try:
        return cls(spec.signal, name=spec.name, **spec.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid parameters for drift detector {spec.name!r} ({spec.kind}): {exc}") from None

