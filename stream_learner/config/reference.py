"""What each setting is called, means and is for: the text behind ``--help`` and the README.

A setting's environment variable and flag are made from its name; its
meaning is the docstring under its field in :class:`~.settings.Settings`;
its group says which verbs show it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import json
import sys
from collections.abc import Iterable
from typing import Any

from .secrets import redact
from .settings import FIELDS, Settings

ENV_PREFIX = "STREAM_LEARNER_"
_DEFAULTS = Settings()


def env_name(field: str) -> str:
    """The environment variable of a setting (``redis_url`` -> ``STREAM_LEARNER_REDIS_URL``)."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line flag of a setting (``redis_url`` -> ``--redis-url``)."""
    return "--" + field.replace("_", "-")


@functools.cache
def field_docs() -> dict[str, str]:
    """Each setting's meaning: the docstring written under its field in :class:`Settings`.

    >>> field_docs()["redis_url"].split(":")[0]
    'Redis of the join state'
    """
    # The docstrings are in the source only: the settings module is parsed for them.
    module = ast.parse(inspect.getsource(sys.modules[Settings.__module__]))
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    docs: dict[str, str] = {}
    for field, doc in itertools.pairwise(cls.body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def format_value(value: Any) -> str:
    """A setting's value as written in env and flags (``""`` for unset or empty).

    >>> format_value(["0", "1"]), format_value(True), format_value(None), format_value(0.01)
    ('0,1', 'true', '', '0.01')
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def default_of(field: str) -> str:
    """A setting's default as written in env and flags (``""`` when it has none)."""
    return format_value(redact(field, getattr(_DEFAULTS, field)))


#: The settings by what they configure, in the order help and docs show them:
#: group -> (title, names). A name ending in "_" is a prefix; the first group
#: that names a setting holds it (so "learning" takes the trainer_* left over).
SETTING_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kafka": (
        "Kafka connection and security",
        ("bootstrap_servers", "kafka_client", "client_id", "security_protocol", "sasl_", "ssl_"),
    ),
    "consumer": ("Kafka consumers", ("consumer_",)),
    "redis": ("Redis", ("redis_",)),
    "topics": ("Topics", ("topic_", "max_event_bytes")),
    "topic_setup": ("Topic creation", ("create_topics", "partitions_", "replication_factor")),
    "joiner": ("Joiner", ("joiner_", "examples_format")),
    "model": (
        "The model (what the trainer learns; a cold-start node's untrained model)",
        (
            "trainer_model",
            "trainer_task",
            "trainer_classes",
            "trainer_features",
            "trainer_architecture",
            "trainer_hidden",
            "trainer_seed",
            "trainer_architecture_params",
            "trainer_collate",
        ),
    ),
    "large": (
        "Large models: a frozen base, delta checkpoints, precision, device",
        (
            "trainer_base_weights",
            "trainer_trainable",
            "trainer_head_modules",
            "trainer_lora_",
            "trainer_full_checkpoint_every",
            "trainer_checkpoint_dtype",
            "trainer_device",
            "serving_base_weights",
            "serving_device",
        ),
    ),
    "checkpoints": (
        "Checkpoints and trainer state",
        ("trainer_checkpoint_", "trainer_state_", "trainer_signing_key", "trainer_group_id", "trainer_chunk_bytes"),
    ),
    "drift": ("Drift", ("trainer_drift_",)),
    "variants": ("Serving variants", ("trainer_variants", "trainer_student_", "variant_")),
    "run": ("The run verb (joiner and trainer together)", ("run_",)),
    "scale": ("Data-parallel trainer", ("trainer_dist_",)),
    "learning": ("Learning", ("trainer_",)),
    "replay": ("Replay", ("replay_",)),
    "serving": ("Serving", ("serving_",)),
    "metrics": ("Metrics and health", ("metrics_port", "health_")),
    "logs": ("Logs", ("log_",)),
}


def group_of(field: str) -> str:
    """The group (a key of :data:`SETTING_GROUPS`) a setting belongs to.

    >>> group_of("trainer_features"), group_of("trainer_lr"), group_of("sasl_password")
    ('model', 'learning', 'kafka')
    """
    for group, (_, names) in SETTING_GROUPS.items():
        if any(field.startswith(n) if n.endswith("_") else field == n for n in names):
            return group
    raise KeyError(f"setting {field} is in no group of SETTING_GROUPS")


def fields_of(groups: Iterable[str]) -> list[str]:
    """The settings of ``groups``, in :data:`FIELDS` order."""
    wanted = set(groups)
    return [f for f in FIELDS if group_of(f) in wanted]
