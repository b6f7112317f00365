"""The one way to build a learner (with its drift detectors and policy) from settings.

The live trainer, replay, the serving node's cold start and the benchmarks
all build what they learn or serve here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..checkpoint.state import DirectoryStateStore, RedisStateStore, RetryingStateStore, StateStore
from ..config import Settings
from ..drift import DriftPolicy
from ..drift import from_settings as drift_from_settings
from ..errors import ConfigError
from ..optimize.student import StudentConfig
from ..redis_conn import make_redis
from ..util.retry import Retry
from .frozen import check_device, load_base
from .inputs import load_tokenizers, parse_inputs
from .learner import LearnerConfig, OnlineLearner
from .models import ModelSpec

if TYPE_CHECKING:
    from .ranks import RankGroup


def learner_config(settings: Settings) -> LearnerConfig:
    """The learner configuration the settings describe (:class:`ConfigError` if they cannot)."""
    if not settings.trainer_features:
        raise ConfigError("trainer_features is empty: declare the model's features (STREAM_LEARNER_TRAINER_FEATURES)")
    lora = settings.trainer_trainable == "lora"
    try:
        inputs = load_tokenizers(parse_inputs(settings.trainer_features))
        spec = ModelSpec(
            kind=settings.trainer_architecture,
            task=settings.trainer_task,
            features=tuple(i.name for i in inputs),
            classes=tuple(settings.trainer_classes),
            hidden=tuple(settings.trainer_hidden),
            seed=settings.trainer_seed,
            lora_layers=tuple(settings.trainer_lora_layers) if lora else (),
            lora_rank=settings.trainer_lora_rank if lora else 0,
            lora_alpha=settings.trainer_lora_alpha if lora else 0.0,
            params=dict(settings.trainer_architecture_params),
            inputs=inputs,
            collate=settings.trainer_collate or "",
        )
    except ValueError as exc:
        raise ConfigError(f"invalid model settings: {exc}") from None
    if lora and not settings.trainer_lora_layers:
        raise ConfigError("trainer_trainable=lora needs trainer_lora_layers (the nn.Linear layers to adapt)")
    if settings.trainer_variants and (spec.inputs or spec.collate):
        raise ConfigError(
            "trainer_variants need a spec of numeric features: the variants' window and student read numbers "
            f"only (features {list(settings.trainer_features)})"
        )
    check_device(settings.trainer_device, what="trainer_device")
    base = load_base(settings.trainer_base_weights) if settings.trainer_base_weights else None
    if base is not None and settings.trainer_variants:
        # The variants rebuild and re-save whole models (stream_learner.optimize): not on a frozen base yet.
        raise ConfigError("trainer_variants cannot be used with trainer_base_weights (not supported yet)")
    if settings.trainer_trainable != "all" and base is None:
        raise ConfigError(
            f"trainer_trainable={settings.trainer_trainable} freezes what does not learn: it needs "
            "trainer_base_weights (the frozen values)"
        )
    return LearnerConfig(
        model_name=settings.trainer_model,
        spec=spec,
        optimizer=settings.trainer_optimizer,
        lr=settings.trainer_lr,
        weight_decay=settings.trainer_weight_decay,
        clip_norm=settings.trainer_clip_norm,
        spike_factor=settings.trainer_spike_factor,
        spike_warmup_batches=settings.trainer_spike_warmup_batches,
        spike_patience=settings.trainer_spike_patience,
        pseudo_enabled=settings.trainer_pseudo_enabled,
        pseudo_threshold=settings.trainer_pseudo_threshold,
        pseudo_weight=settings.trainer_pseudo_weight,
        dedup_window=settings.trainer_dedup_window,
        metrics_window=settings.trainer_metrics_window,
        # The serving variants' parts, only when variants are derived here (stream_learner.optimize).
        recent_window=settings.variant_window if settings.trainer_variants else 0,
        student=StudentConfig(
            hidden=tuple(settings.trainer_student_hidden),
            alpha=settings.trainer_student_alpha,
            temperature=settings.trainer_student_temperature,
            lr=settings.trainer_student_lr,
        )
        if "student" in settings.trainer_variants
        else None,
        base=base,
        trainable=settings.trainer_trainable,
        head_modules=tuple(settings.trainer_head_modules),
        device=settings.trainer_device,
    )


def build_learner(settings: Settings, group: RankGroup | None = None) -> tuple[OnlineLearner, DriftPolicy]:
    """The learner the settings describe, with its drift detectors (if on), and the drift policy; in a
    data-parallel ``group``, one rank's learner."""
    monitor, policy = drift_from_settings(settings)
    try:
        return OnlineLearner(learner_config(settings), drift=monitor, group=group), policy
    except ValueError as exc:  # a base or a selection that does not fit the architecture
        raise ConfigError(f"invalid model settings: {exc}") from None


def state_store(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> StateStore:
    """The trainer's state store the settings name (a directory by default, or Redis).

    The Redis store is retried while Redis is unavailable (down, restarting,
    loading), until ``stop`` is set; ``on_retry(error, delay)`` runs before
    each wait. A directory fails at once: its errors (permissions, a full
    disk) need a person.
    """
    if settings.trainer_state_store == "redis":
        return RetryingStateStore(
            RedisStateStore(
                make_redis(settings, key := f"sl:trainer:{settings.trainer_model}:state"),
                key,
                replicas=settings.redis_wait_replicas,
            ),
            Retry("redis (trainer state)", stop=stop, on_retry=on_retry),
        )
    return DirectoryStateStore(settings.trainer_state_dir)
