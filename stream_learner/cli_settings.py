"""The settings each ``stream-learner`` verb takes: its flags, its ``--help``, the README's reference.

Every verb takes as flags the settings of the groups it uses
(:data:`VERB_SETTINGS`), each documented by its field doc in
:class:`~stream_learner.config.Settings`; :func:`settings_reference` renders
the same docs as the README's tables. :mod:`stream_learner.cli` builds the
command from these parsers and dispatches.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable

from .config import (
    FIELDS,
    SETTING_GROUPS,
    Settings,
    default_of,
    field_docs,
    fields_of,
    flag_name,
    group_of,
)


class VerbParser(argparse.ArgumentParser):
    """An argument parser whose own arguments can be added on first use (``arguments_from``).

    For a verb whose arguments are defined beside an implementation that is
    costly to import: they are added only when that verb is parsed or its
    help or usage is shown.
    """

    def __init__(
        self,
        *args: typing.Any,
        arguments_from: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: typing.Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._arguments_from = arguments_from

    def _complete(self) -> None:
        if self._arguments_from is not None:
            add, self._arguments_from = self._arguments_from, None
            add(self)

    def parse_known_args(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        self._complete()
        return super().parse_known_args(*args, **kwargs)

    def _settings_usage(self) -> None:
        # The usage line names the verb's own arguments; its settings flags are in the help below it.
        if self.usage is None and any(a.dest in FIELDS for a in self._actions):
            formatter = self._get_formatter()
            formatter.add_usage(None, [a for a in self._actions if a.dest not in FIELDS], [])
            self.usage = formatter.format_help().strip().removeprefix("usage: ") + " [--SETTING VALUE ...]"

    def format_usage(self) -> str:
        self._complete()
        self._settings_usage()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        self._settings_usage()
        return super().format_help()


_ROLE_GROUPS = {
    "joiner": ("kafka", "consumer", "redis", "topics", "topic_setup", "joiner", "metrics", "logs"),
    "trainer": (
        "kafka",
        "consumer",
        "redis",
        "topics",
        "topic_setup",
        "model",
        "large",
        "learning",
        "checkpoints",
        "drift",
        "variants",
        "metrics",
        "logs",
    ),
}

#: The settings each verb uses, as groups of :data:`~stream_learner.config.SETTING_GROUPS`, less the
#: ones the verb sets itself: its flags and ``--help`` offer exactly these.
VERB_SETTINGS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "joiner": (_ROLE_GROUPS["joiner"], frozenset()),
    "trainer": ((*_ROLE_GROUPS["trainer"], "scale"), frozenset()),
    "run": ((*dict.fromkeys(_ROLE_GROUPS["joiner"] + _ROLE_GROUPS["trainer"]), "run"), frozenset()),
    "serve": (
        ("kafka", "consumer", "topics", "topic_setup", "model", "large", "serving", "metrics", "logs"),
        frozenset(),
    ),
    "replay": (
        (
            "kafka",
            "consumer",
            "redis",
            "topics",
            "joiner",
            "model",
            "large",
            "learning",
            "checkpoints",
            "drift",
            "variants",
            "replay",
            "logs",
        ),
        frozenset(),
    ),
    "topics": (("kafka", "topics", "topic_setup", "logs"), frozenset({"create_topics"})),
    "config": (tuple(SETTING_GROUPS), frozenset()),
    "optimize": (("kafka", "consumer", "topics", "model", "checkpoints", "variants", "metrics", "logs"), frozenset()),
    # The registry's writer signs with the trainer's key; listing verifies with the nodes' keys (or that key's half).
    "models": (
        ("kafka", "topics", "checkpoints", "serving", "logs"),
        frozenset(
            f
            for f in FIELDS
            if (f.startswith(("trainer_checkpoint_", "trainer_state_", "serving_")) or f == "trainer_group_id")
            and f not in ("serving_public_keys", "serving_scan_max_records", "serving_scan_max_bytes")
        ),
    ),
    "keys": ((), frozenset()),
    "local": (("topics", "topic_setup", "logs"), frozenset({"create_topics"})),
    # The demo runs its own servers, model and cadence (tools/demo/job.py); the learning itself is yours to vary.
    "demo": (("learning", "drift", "logs"), frozenset({"trainer_max_wait_ms"})),
    "smoke": (("logs",), frozenset()),
}


def verb_fields(verb: str) -> list[str]:
    """The settings ``verb`` takes as flags and lists in its help."""
    groups, excluded = VERB_SETTINGS[verb]
    return [f for f in fields_of(groups) if f not in excluded]


def settings_reference() -> str:
    """The README's settings tables (Markdown): per group, the verbs that use it, and each setting's default
    and meaning, from the same field docs as each verb's ``--help``."""
    docs, out = field_docs(), []
    for group, (title, _) in SETTING_GROUPS.items():
        fields = fields_of([group])
        verbs = [v for v in VERB_SETTINGS if v != "config" and set(fields) & set(verb_fields(v))]
        out += [
            f"**{title}** ({', '.join(f'`{v}`' for v in verbs) or 'no verb: the environment or a file'})",
            "",
            "| setting | default | meaning |",
            "|---|---|---|",
        ]
        for field in fields:
            default = default_of(field)
            shown = f"`{default}`" if default else "—"
            out.append(f"| `{field}` | {shown} | {docs[field].replace('|', '&#124;')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _metavar(field: str, hint: typing.Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal or (args and typing.get_origin(args[0]) is typing.Literal):
        return "{" + ",".join(typing.get_args(hint if typing.get_origin(hint) is typing.Literal else args[0])) + "}"
    if typing.get_origin(hint) is list:
        return "FILE,..." if field.endswith("_keys") else "A,B,..."
    for suffix, name in (
        ("_url", "URL"),
        ("_dir", "DIR"),
        ("_ms", "MS"),
        ("_s", "SECONDS"),
        ("_port", "PORT"),
        ("_bytes", "BYTES"),
        ("file", "FILE"),
        ("_certs", "FILE"),
        ("_key", "FILE"),
    ):
        if field.endswith(suffix):
            return name
    base = args[0] if args else hint
    return {int: "N", float: "NUMBER"}.get(base, "TEXT")


def settings_parser(verb: str) -> VerbParser:
    """A parent parser with ``--config`` and one flag per setting ``verb`` uses, grouped, documented."""
    parent = VerbParser(add_help=False)
    fields = verb_fields(verb)
    if verb == "keys":
        return parent
    parent.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file (above the environment, below flags); it may hold any setting",
    )
    hints = typing.get_type_hints(Settings)
    docs = field_docs()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in fields:
        group = group_of(field)
        if group not in groups:
            groups[group] = parent.add_argument_group(f"settings: {SETTING_GROUPS[group][0].lower()}")
        text = f"{docs[field]} (default: {default_of(field) or 'unset'})".replace("%", "%%")
        # Flags default to None so only the ones given override env and TOML.
        if hints[field] is bool:
            groups[group].add_argument(
                flag_name(field), dest=field, default=None, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            groups[group].add_argument(
                flag_name(field), dest=field, default=None, metavar=_metavar(field, hints[field]), help=text
            )
    return parent
