"""Settings: defaults, then environment, then a TOML file, then CLI flags.

One :class:`Settings` object is built at the entry point and passed down;
nothing reads the environment or a global later. Precedence, lowest first:

1. the defaults below;
2. environment variables ``STREAM_LEARNER_<NAME>`` (``STREAM_LEARNER_REDIS_URL``);
3. the TOML file given with ``--config`` (an explicit file beats ambient
   environment); keys are the setting names, and a table flattens into its
   prefix (``[redis] url = ...`` is ``redis_url``; ``[kafka]`` keys need no
   prefix);
4. command-line flags (``--redis-url``), which always win.

An unknown ``STREAM_LEARNER_*`` variable or TOML key, or an invalid value,
fails at start with :class:`~stream_learner.errors.ConfigError` naming the
setting and where it came from.

>>> s = load_settings(env={"STREAM_LEARNER_METRICS_PORT": "9100"},
...                   flags={"redis_url": "redis://cache:6379/1"})
>>> s.metrics_port, s.redis_url, s.bootstrap_servers
(9100, 'redis://cache:6379/1', '127.0.0.1:9092')
>>> load_settings(env={"STREAM_LEARNER_METRICS_PORT": "http"})
Traceback (most recent call last):
...
stream_learner.errors.ConfigError: invalid setting metrics_port (from environment variable STREAM_LEARNER_METRICS_PORT='http'): Expected `int | null`, got `str`
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .errors import ConfigError

ENV_PREFIX = "STREAM_LEARNER_"

Port = Annotated[int, Meta(ge=0, le=65535)]
Positive = Annotated[int, Meta(ge=1)]
TopicName = Annotated[str, Meta(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")]


class Settings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every setting of every role; see the README's configuration table."""

    # Kafka connection; security settings are passed to kafka-python as they are.
    bootstrap_servers: Annotated[str, Meta(min_length=1)] = "127.0.0.1:9092"
    client_id: str = "stream-learner"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_check_hostname: bool = True

    # Consumer groups. Tansu waits a whole rebalance timeout (= max poll
    # interval) on every join, so tests and the demo use short values.
    consumer_session_timeout_ms: Annotated[int, Meta(ge=1000)] = 45_000
    consumer_max_poll_interval_ms: Annotated[int, Meta(ge=1000)] = 300_000
    # How long the broker may hold a fetch while nothing new is there. Apache
    # Kafka answers as soon as a record arrives; Tansu holds the whole wait,
    # which then adds to every hop's latency (the demo sets 50).
    consumer_fetch_max_wait_ms: Annotated[int, Meta(ge=0)] = 500

    # Redis: rediss:// in the URL turns TLS on; AUTH from the URL or these.
    redis_url: Annotated[str, Meta(pattern=r"^(redis|rediss|unix)://")] = "redis://127.0.0.1:6379/0"
    redis_username: str | None = None
    redis_password: str | None = None
    redis_ssl_ca_certs: str | None = None
    redis_ssl_certfile: str | None = None
    redis_ssl_keyfile: str | None = None

    # Topics (docs/architecture.md, "Topics").
    topic_predictions: TopicName = "sl.predictions"
    topic_labels: TopicName = "sl.labels"
    topic_examples: TopicName = "sl.examples"
    topic_models: TopicName = "sl.models"
    topic_drift: TopicName = "sl.drift"
    topic_dlq: TopicName = "sl.dlq"
    # Partitions used when stream-learner creates the topics itself.
    partitions_input: Positive = 3
    partitions_examples: Positive = 1
    replication_factor: Positive = 1

    # Events larger than this are refused before decoding (dead-lettered).
    max_event_bytes: Positive = 1 << 20

    # Joiner (README, "The joiner"). Times are event-time milliseconds unless
    # they say wall-clock.
    joiner_group_id: str = "stream-learner-joiner"
    joiner_window_ms: Positive = 10 * 60 * 1000
    joiner_allowed_lateness_ms: Annotated[int, Meta(ge=0)] = 0
    joiner_late_retention_ms: Annotated[int, Meta(ge=0)] = 24 * 3600 * 1000
    joiner_orphan_retention_ms: Annotated[int, Meta(ge=0)] = 3600 * 1000
    # Wall-clock safety net: Redis drops any join state older than this.
    joiner_state_ttl_ms: Positive = 7 * 24 * 3600 * 1000
    # Wall-clock: a caught-up partition with no record this long is idle and stops holding the
    # watermark back; one no joiner reported this long is active (README, the joiner's idle rules).
    joiner_idle_timeout_ms: Positive = 60 * 1000
    # When every input is idle, let their event times run on with the wall clock (closing windows).
    joiner_idle_advance: bool = True
    joiner_max_poll_records: Positive = 5000
    joiner_max_expire_per_poll: Positive = 20000
    # Wall-clock: unacknowledged emissions of a crashed joiner are re-emitted after this.
    joiner_outbox_lease_ms: Positive = 30 * 1000
    # Wait for Redis to fsync its AOF before committing input offsets.
    joiner_wait_aof: bool = True
    joiner_redis_prefix: Annotated[str, Meta(min_length=1)] = "sl:{j}:"

    # Trainer (README, "The trainer").
    trainer_model: Annotated[str, Meta(min_length=1)] = "default"
    trainer_task: Literal["binary", "multiclass", "regression"] = "binary"
    trainer_classes: list[str] = msgspec.field(default_factory=lambda: ["0", "1"])
    trainer_features: list[str] = []
    trainer_architecture: Annotated[str, Meta(min_length=1)] = "mlp"
    trainer_hidden: list[Annotated[int, Meta(ge=1)]] = msgspec.field(default_factory=lambda: [64])
    trainer_seed: int = 0
    trainer_batch_size: Positive = 32
    trainer_max_wait_ms: Positive = 500
    trainer_optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    trainer_lr: Annotated[float, Meta(gt=0)] = 0.01
    trainer_weight_decay: Annotated[float, Meta(ge=0)] = 0.0
    trainer_clip_norm: Annotated[float, Meta(ge=0)] = 1.0
    trainer_spike_factor: Annotated[float, Meta(gt=1)] = 5.0
    trainer_spike_warmup_batches: Annotated[int, Meta(ge=0)] = 20
    trainer_spike_patience: Annotated[int, Meta(ge=0)] = 3
    # Small models run faster (and reproducibly) on one thread.
    trainer_torch_threads: Positive = 1
    trainer_pseudo_enabled: bool = True
    trainer_pseudo_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.9
    trainer_pseudo_weight: Annotated[float, Meta(ge=0)] = 0.3
    trainer_dedup_window: Positive = 100_000
    trainer_metrics_window: Positive = 1000
    trainer_checkpoint_every_examples: Positive = 10_000
    trainer_checkpoint_every_s: Annotated[float, Meta(gt=0)] = 30.0
    trainer_state_store: Literal["directory", "redis"] = "directory"
    trainer_state_dir: str = ".stream-learner/trainer-state"
    trainer_signing_key: str | None = None
    trainer_group_id: str = "stream-learner-trainer"
    trainer_chunk_bytes: Annotated[int, Meta(ge=1024)] = 512 * 1024
    # Drift (README, "Drift"): ADWIN on the error, Page-Hinkley on the loss,
    # ADWIN on the confidence (label-free); what to do when they fire.
    trainer_drift_enabled: bool = True
    trainer_drift_challenger_on_warning: bool = False
    trainer_drift_on_drift: list[Literal["promote_challenger_if_better", "optimizer_reset", "lr_boost",
                                         "checkpoint"]] = msgspec.field(
        default_factory=lambda: ["promote_challenger_if_better", "lr_boost", "checkpoint"])
    trainer_drift_lr_boost_factor: Annotated[float, Meta(gt=1)] = 2.0
    trainer_drift_lr_boost_batches: Positive = 100

    # Replay (README, "Replay"): where a replay keeps its resumable state, and
    # the join step size, which defines the replayed watermark's progress.
    replay_state_dir: str = ".stream-learner/replay"
    replay_join_step_events: Positive = 5000

    # Serving side (README, "Serving"): the checkpoint subscriber and `serve`.
    serving_model: str | None = None  # the model name to follow; None: trainer_model
    serving_public_keys: list[str] = []  # PEM files of trusted trainer public keys
    serving_pin_version: Annotated[int, Meta(ge=1)] | None = None
    serving_host: str = "127.0.0.1"
    serving_port: Port = 8080

    # Observability.
    metrics_port: Port | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    def __post_init__(self) -> None:
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None:
                raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")
            if not (self.sasl_username and self.sasl_password):
                raise ValueError("sasl_username and sasl_password are required for SASL")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile must be set together")
        if self.joiner_state_ttl_ms < self.joiner_window_ms + self.joiner_late_retention_ms:
            raise ValueError(
                "joiner_state_ttl_ms must be at least joiner_window_ms + joiner_late_retention_ms"
            )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for logging."""
        return {
            k: ("***" if k.endswith("password") and v else v)
            for k, v in msgspec.structs.asdict(self).items()
        }

    @property
    def topics(self) -> dict[str, str]:
        """Role name -> topic name, for every topic of docs/architecture.md."""
        return {
            "predictions": self.topic_predictions,
            "labels": self.topic_labels,
            "examples": self.topic_examples,
            "models": self.topic_models,
            "drift": self.topic_drift,
            "dlq": self.topic_dlq,
        }


FIELDS: tuple[str, ...] = Settings.__struct_fields__


def env_name(field: str) -> str:
    """The environment variable of a setting (``redis_url`` -> ``STREAM_LEARNER_REDIS_URL``)."""
    return ENV_PREFIX + field.upper()


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a ``stream-learner`` process load exactly ``settings``.

    ``base`` (default: this process's environment) minus any
    ``STREAM_LEARNER_*`` variable, plus one variable per non-default setting.

    >>> settings_env(Settings(trainer_classes=["no", "yes"]), base={})
    {'STREAM_LEARNER_TRAINER_CLASSES': 'no,yes'}
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(ENV_PREFIX)}
    defaults = Settings()
    for field in FIELDS:
        value = getattr(settings, field)
        if value == getattr(defaults, field) or value is None:
            continue
        if isinstance(value, bool):
            env[env_name(field)] = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            env[env_name(field)] = ",".join(map(str, value))
        else:
            env[env_name(field)] = str(value)
    return env


def flag_name(field: str) -> str:
    """The command-line flag of a setting (``redis_url`` -> ``--redis-url``)."""
    return "--" + field.replace("_", "-")


#: Settings that are lists: an environment variable or flag gives them comma-separated.
LIST_FIELDS = frozenset(
    name for name, hint in typing.get_type_hints(Settings).items() if typing.get_origin(hint) is list
)


def _split_lists(field: str, value: Any) -> Any:
    if field in LIST_FIELDS and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        field = key[len(ENV_PREFIX):].lower()
        if field not in FIELDS:
            raise ConfigError(f"unknown setting in environment variable {key}")
        if value == "":
            continue  # empty means unset, so compose files can pass ${VAR:-} through
        out[field] = (_split_lists(field, value), f"environment variable {key}={value!r}")
    return out


def _from_toml(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    out: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            prefix = "" if key == "kafka" else f"{key}_"
            items = [(prefix + k, v) for k, v in value.items()]
        else:
            items = [(key, value)]
        for field, v in items:
            if field not in FIELDS or isinstance(v, dict):
                raise ConfigError(f"unknown setting {field!r} in config file {path}")
            out[field] = (v, f"config file {path}")
    return out


def load_settings(
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from the environment, a TOML file and CLI flags.

    ``env`` defaults to ``os.environ``; ``flags`` maps setting names to values
    (``None`` values are ignored, so an argparse namespace can be passed as is).
    """
    layers = _from_env(os.environ if env is None else env)
    if config_file is not None:
        layers.update(_from_toml(Path(config_file)))
    for field, value in (flags or {}).items():
        if field not in FIELDS:
            raise ConfigError(f"unknown setting {field!r} passed as a flag")
        if value is not None:
            layers[field] = (_split_lists(field, value), f"flag {flag_name(field)}={value!r}")
    values = {field: value for field, (value, _) in layers.items()}
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = re.search(r" - at `\$\.(\w+)`$", msg)
        if m:
            field = m.group(1)
            where = layers[field][1] if field in layers else "default"
            raise ConfigError(f"invalid setting {field} (from {where}): {msg[: m.start()]}") from None
        raise ConfigError(f"invalid settings: {msg}") from None
