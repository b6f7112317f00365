"""Settings: defaults, then environment, then a TOML file, then CLI flags.

One :class:`Settings` object is built at the entry point and passed down;
nothing reads the environment or a global later. Precedence, lowest first:

1. the defaults (:mod:`.settings`);
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
>>> load_settings(env={"STREAM_LEARNER_METRICS_PORT": "http"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
stream_learner.errors.ConfigError: invalid setting metrics_port (from environment variable ...='http'): Expected ...

* :mod:`.settings` — the :class:`Settings` struct: every field, its bounds, its default, its meaning;
* :mod:`.loading` — the layers above, merged and validated (:func:`load_settings`, :func:`settings_env`);
* :mod:`.reference` — names, meanings and groups of the settings (``--help``, the README);
* :mod:`.secrets` — masking passwords and credentials in URLs wherever a value is shown.
"""

from .loading import DICT_FIELDS, LIST_FIELDS, load_settings, load_settings_with_origins, settings_env
from .reference import (
    ENV_PREFIX,
    SETTING_GROUPS,
    default_of,
    env_name,
    field_docs,
    fields_of,
    flag_name,
    format_value,
    group_of,
)
from .secrets import is_secret, mask_secrets, redact
from .settings import FIELDS, SECRET_FIELDS, Port, Positive, Settings, TopicName

__all__ = [
    "DICT_FIELDS",
    "ENV_PREFIX",
    "FIELDS",
    "LIST_FIELDS",
    "SECRET_FIELDS",
    "SETTING_GROUPS",
    "Port",
    "Positive",
    "Settings",
    "TopicName",
    "default_of",
    "env_name",
    "field_docs",
    "fields_of",
    "flag_name",
    "format_value",
    "group_of",
    "is_secret",
    "load_settings",
    "load_settings_with_origins",
    "mask_secrets",
    "redact",
    "settings_env",
]
