"""Loading the settings: defaults, then environment, then a TOML file, then CLI flags.

Each layer is parsed into values with where they came from, the layers are
merged by precedence, and msgspec validates the result into
:class:`~.settings.Settings`; an invalid value is reported naming the
setting and its origin. :func:`settings_env` is the way back: the
environment that loads given settings.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from ..errors import ConfigError
from .reference import ENV_PREFIX, env_name, flag_name, format_value
from .secrets import mask_secrets, redact
from .settings import FIELDS, Settings

_DEFAULTS = Settings()


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a ``stream-learner`` process load exactly ``settings``.

    ``base`` (default: this process's environment) minus any
    ``STREAM_LEARNER_*`` variable, plus one variable per non-default setting.

    >>> settings_env(Settings(trainer_classes=["no", "yes"]), base={})
    {'STREAM_LEARNER_TRAINER_CLASSES': 'no,yes'}
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(ENV_PREFIX)}
    for field in FIELDS:
        value = getattr(settings, field)
        if value == getattr(_DEFAULTS, field) or value is None:
            continue
        env[env_name(field)] = format_value(value)
    return env


#: Settings that are lists: an environment variable or flag gives them comma-separated.
LIST_FIELDS = frozenset(
    name for name, hint in typing.get_type_hints(Settings).items() if typing.get_origin(hint) is list
)


#: Settings that are tables: an environment variable or flag gives them as a JSON object.
DICT_FIELDS = frozenset(
    name for name, hint in typing.get_type_hints(Settings).items() if typing.get_origin(hint) is dict
)


def _split_lists(field: str, value: Any) -> Any:
    if field in LIST_FIELDS and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if field in DICT_FIELDS and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value  # refused as a string (not an object), naming the setting and where it came from
    return value


class _Layer(typing.NamedTuple):
    value: Any
    origin: str  # "env STREAM_LEARNER_X", "file PATH", "flag --x" (config --show-origin)
    described: str  # for error messages, with the value as given (secrets masked)


def _from_env(env: Mapping[str, str]) -> dict[str, _Layer]:
    out: dict[str, _Layer] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        field = key[len(ENV_PREFIX) :].lower()
        if field not in FIELDS:
            raise ConfigError(f"unknown setting in environment variable {key}")
        if value == "":
            continue  # empty means unset, so compose files can pass ${VAR:-} through
        out[field] = _Layer(
            _split_lists(field, value), f"env {key}", f"environment variable {key}={redact(field, value)!r}"
        )
    return out


def _from_toml(path: Path) -> dict[str, _Layer]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    out: dict[str, _Layer] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in DICT_FIELDS:
            prefix = "" if key == "kafka" else f"{key}_"
            items = [(prefix + k, v) for k, v in value.items()]
        else:
            items = [(key, value)]
        for field, v in items:
            if field not in FIELDS or (isinstance(v, dict) and field not in DICT_FIELDS):
                raise ConfigError(f"unknown setting {field!r} in config file {path}")
            out[field] = _Layer(v, f"file {path}", f"config file {path}")
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
    return load_settings_with_origins(env=env, config_file=config_file, flags=flags)[0]


def load_settings_with_origins(
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """:func:`load_settings`, and where each value came from.

    The origin of a setting is ``default``, ``env STREAM_LEARNER_<NAME>``,
    ``file <path>`` or ``flag --<name>`` (what ``config --show-origin`` prints).

    >>> s, origins = load_settings_with_origins(env={"STREAM_LEARNER_LOG_LEVEL": "debug"},
    ...                                         flags={"metrics_port": "9100"})
    >>> origins["log_level"], origins["metrics_port"], origins["redis_url"]
    ('env STREAM_LEARNER_LOG_LEVEL', 'flag --metrics-port', 'default')
    """
    layers = _from_env(os.environ if env is None else env)
    if config_file is not None:
        layers.update(_from_toml(Path(config_file)))
    for field, value in (flags or {}).items():
        if field not in FIELDS:
            raise ConfigError(f"unknown setting {field!r} passed as a flag")
        if value is not None:
            layers[field] = _Layer(
                _split_lists(field, value),
                f"flag {flag_name(field)}",
                f"flag {flag_name(field)}={redact(field, value)!r}",
            )
    values = {field: layer.value for field, layer in layers.items()}
    try:
        settings = msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = re.search(r" - at `\$\.(\w+)`$", msg)
        if m:
            field = m.group(1)
            where = layers[field].described if field in layers else "default"
            raise ConfigError(f"invalid setting {field} (from {where}): {msg[: m.start()]}") from None
        raise ConfigError(f"invalid settings: {mask_secrets(msg)}") from None
    origins = {field: layers[field].origin if field in layers else "default" for field in FIELDS}
    return settings, origins
