"""The ``stream-learner`` command: one entry point, one sub-command per role.

Each sub-command takes the settings it uses as flags (``--bootstrap-servers``,
``--redis-url``, ...; :data:`VERB_SETTINGS`) plus ``--config FILE``, and its
``--help`` lists just those, each with its meaning and default, taken from
the field docs of :class:`~stream_learner.config.Settings`. The environment
and the TOML file may hold any setting (one file for every role). Logging is
configured here, once. Each verb imports its implementation in its handler,
so a verb loads only what it runs (the joiner, say, never loads torch).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import structlog

from .config import (
    FIELDS,
    SETTING_GROUPS,
    Settings,
    default_of,
    env_name,
    field_docs,
    fields_of,
    flag_name,
    group_of,
    load_settings_with_origins,
)
from .errors import StreamLearnerError
from .logging import configure_logging
from .metrics import Metrics

log = structlog.get_logger("stream_learner")

DEFAULT_STATE = Path(".stream-learner/local.json")


class _Parser(argparse.ArgumentParser):
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


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    # Replay's module imports the learner, hence torch and River.
    from .replay.cli import add_arguments

    add_arguments(parser)


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
    "trainer": (_ROLE_GROUPS["trainer"], frozenset()),
    "run": (tuple(dict.fromkeys(_ROLE_GROUPS["joiner"] + _ROLE_GROUPS["trainer"])), frozenset()),
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

#: The topics each long-running verb reads or writes, checked at its start (see :func:`_check_topics`).
VERB_TOPICS: dict[str, tuple[str, ...]] = {
    "joiner": ("predictions", "labels", "examples", "dlq"),
    "trainer": ("examples", "models", "drift", "dlq"),
    "run": ("predictions", "labels", "examples", "models", "drift", "dlq"),
    "serve": ("models", "predictions"),
    "optimize": ("examples", "models"),
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


def _settings_parser(verb: str) -> _Parser:
    """A parent parser with ``--config`` and one flag per setting ``verb`` uses, grouped, documented."""
    parent = _Parser(add_help=False)
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


class _TopParser(argparse.ArgumentParser):
    """The ``stream-learner`` parser: says when an unknown flag is a setting the verb does not use."""

    _argv: Sequence[str] = ()

    def parse_known_args(self, args: typing.Any = None, namespace: typing.Any = None) -> typing.Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = {flag_name(f): f for f in FIELDS} | {"--no-" + flag_name(f)[2:]: f for f in FIELDS}
            flags = [a.split("=")[0] for a in message.split(":", 1)[1].split()]
            if settings := [known[f] for f in flags if f in known]:
                verb = next((a for a in self._argv if a in VERB_SETTINGS), "this verb")
                message += (
                    f"; `{verb}` does not use {', '.join(settings)} (`stream-learner {verb} --help` lists"
                    " the settings it does; the environment and a --config file may hold any setting)"
                )
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stream-learner`` command."""
    parser = _TopParser(prog="stream-learner", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(verb: str) -> list[_Parser]:
        return [_settings_parser(verb)]

    demo = sub.add_parser(
        "demo",
        parents=common("demo"),
        help="the main job: local servers, a serving node, a drifting application, "
        "the pipeline learning live; writes a report",
    )
    # The defaults are DemoConfig's, applied in cmd_demo: importing it here would load the demo for every verb.
    demo.add_argument("--rate", type=float, help="requests per second")
    demo.add_argument("--seconds", type=float, help="seconds of traffic")
    demo.add_argument("--out", type=Path, help="directory for the report")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--quiet", action="store_true", help="no live progress line")
    demo.add_argument(
        "--variants",
        type=_variant_list,
        help="serving variants the trainer derives and the report replays, comma-separated "
        "(int8, pruned, sparse, student; '' for none; default int8,sparse,student)",
    )
    demo.set_defaults(func=cmd_demo)

    smoke = sub.add_parser(
        "smoke", parents=common("smoke"), help="count check on local servers: SDK -> decoder/DLQ -> joiner -> trainer"
    )
    smoke.add_argument("--events", type=int, default=20_000, help="predictions to send")
    smoke.set_defaults(func=cmd_smoke)

    serve = sub.add_parser(
        "serve",
        parents=common("serve"),
        help="the reference serving node: HTTP predict, hot-swapped verified checkpoints",
    )
    serve.add_argument(
        "--cold-start",
        dest="serving_cold_start",
        action="store_const",
        const=True,
        help="the same as --serving-cold-start",
    )
    serve.set_defaults(func=cmd_serve)

    joiner = sub.add_parser(
        "joiner", parents=common("joiner"), help="join predictions and labels into examples (consumer group)"
    )
    joiner.set_defaults(func=cmd_joiner)

    trainer = sub.add_parser(
        "trainer",
        parents=common("trainer"),
        help="train the model online from the examples topic and publish checkpoints",
    )
    trainer.set_defaults(func=cmd_trainer)

    optimize = sub.add_parser(
        "optimize",
        parents=common("optimize"),
        help="derive gated serving variants (int8, pruned, sparse) of each new model version",
    )
    optimize.set_defaults(func=cmd_optimize)

    run = sub.add_parser("run", parents=common("run"), help="joiner and trainer in one process (small deployments)")
    run.set_defaults(func=cmd_run)

    keys = sub.add_parser("keys", parents=common("keys"), help="checkpoint signing keys")
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("--out", type=Path, required=True, help="directory for signing.pem and signing.pub.pem")
    keys.set_defaults(func=cmd_keys)

    local = sub.add_parser("local", parents=common("local"), help="local Tansu + Valkey servers for development")
    local.add_argument("action", choices=["up", "down"])
    local.add_argument("--state-file", type=Path, default=DEFAULT_STATE)
    local.set_defaults(func=cmd_local)

    topics = sub.add_parser("topics", parents=common("topics"), help="create the topics that do not exist yet")
    topics.add_argument("action", choices=["create"])
    topics.set_defaults(func=cmd_topics)

    config = sub.add_parser("config", parents=common("config"), help="print the effective settings (secrets masked)")
    config.add_argument(
        "--show-origin", action="store_true", help="also say where each value comes from: default, env, file or flag"
    )
    config.set_defaults(func=cmd_config)

    models = sub.add_parser(
        "models",
        parents=common("models"),
        help="the model registry on the model topic: list, show, alias, pin, unpin, rollback (signed records)",
    )
    models.add_argument(
        "action",
        choices=["list", "show", "alias", "pin", "unpin", "rollback"],
        help="list | show MODEL | alias MODEL ALIAS VERSION | pin MODEL VERSION | unpin MODEL | rollback MODEL",
    )
    models.add_argument("names", nargs="*", metavar="ARG", help="the action's model, alias and version")
    models.add_argument("--alias", default="champion", help="rollback: the alias moved back (default: champion)")
    models.add_argument("--to", type=int, metavar="VERSION", help="rollback: the version to go back to")
    models.set_defaults(func=cmd_models)

    replay = sub.add_parser(
        "replay",
        parents=common("replay"),
        arguments_from=_replay_arguments,
        help="re-run join and training over a closed range of the topics into a new lineage",
    )
    replay.set_defaults(func=cmd_replay)

    helps = {action.dest: action.help for action in sub._choices_actions}
    for verb, verb_parser in sub.choices.items():
        verb_parser.description = helps[verb]
        if verb_fields(verb):
            verb_parser.epilog = _SETTINGS_NOTE
    return parser


_SETTINGS_NOTE = (
    f"Each setting is also the environment variable {env_name('<name>')} (e.g. {env_name('redis_url')})"
    " and a key of the --config TOML file, which may hold any setting; a flag beats the file, the file"
    " the environment. `stream-learner config --show-origin` prints the effective settings and where"
    " each comes from."
)


def _variant_list(text: str) -> tuple[str, ...]:
    """``--variants``: names of serving variants, comma-separated ('' for none).

    >>> _variant_list("int8, student"), _variant_list("")
    (('int8', 'student'), ())
    """
    from .optimize.variants import NAMES

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant {', '.join(unknown)}: use {', '.join(NAMES)}")
    return names


def cmd_demo(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """The main job (see :mod:`stream_learner.tools.demo`); print its summary, exit 0 if nothing failed."""
    from .tools.demo import DemoConfig, describe, run_demo

    given = {
        name: value
        for name in ("rate", "seconds", "out", "seed", "variants")
        if (value := getattr(args, name)) is not None
    }
    config = DemoConfig(**given)
    summary = run_demo(settings, config, progress=not args.quiet)
    if not args.quiet:
        print(describe(summary), file=sys.stderr)
    print(json.dumps(summary, indent=2))
    failed = (
        summary["requests"]["failed"]
        or summary["labels"]["sdk_failed"]
        or summary["labels"]["sdk_dropped"]
        or not summary["checkpoints"]["swaps_at_node"]
        or not summary["complete"]
    )
    return 1 if failed else 0


def _check_topics(verb: str, settings: Settings) -> None:
    """Stop a role at start, naming the topics it needs that do not exist (or create them: ``create_topics``)."""
    from .bus import check_topics

    check_topics(settings, VERB_TOPICS[verb], who="joiner and trainer" if verb == "run" else verb)


def cmd_serve(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Run the serving node until SIGTERM or Ctrl-C."""
    from .serving import run_node

    _check_topics("serve", settings)
    run_node(settings, metrics, cold_start=settings.serving_cold_start, stop=_stop_on_signals())
    return 0


def cmd_smoke(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """The count check (see :mod:`stream_learner.tools.smoke`): print its summary, exit 0 if every count matches."""
    from .local import LocalServers
    from .tools.smoke import run_smoke

    # Short windows and idle timeout: the check's traffic stops after a few seconds.
    short = msgspec.structs.replace(
        settings,
        joiner_window_ms=2000,
        joiner_idle_timeout_ms=1000,
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
    )
    with LocalServers(short) as servers:
        summary = run_smoke(servers.settings, events=args.events, metrics=metrics)
    print(json.dumps(summary, indent=2))
    ok = (
        summary["lost"] == 0
        and summary["sdk_failed"] == 0
        and all(summary["examples_joined"].get(k, 0) == n for k, n in summary["examples_expected"].items())
    )
    return 0 if ok else 1


def _stop_on_signals() -> threading.Event:
    # Finish the current cycle, then stop: nothing half-done to recover from.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_joiner(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Run the joiner until SIGTERM or Ctrl-C."""
    from .join.joiner import Joiner
    from .util.retry import Stopped

    _check_topics("joiner", settings)
    try:
        Joiner(settings, metrics=metrics).run(_stop_on_signals())
    except Stopped:
        log.info("joiner_stopped_while_waiting")  # nothing half-done: the outbox and offsets say where it was
    return 0


def cmd_trainer(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Run the trainer until SIGTERM or Ctrl-C (a trainer started while its state store is down waits for it)."""
    from .learn.trainer import Trainer
    from .util.retry import Stopped

    _check_topics("trainer", settings)
    stop = _stop_on_signals()
    try:
        trainer = Trainer(settings, metrics=metrics, stop=stop)
    except Stopped:
        log.info("trainer_stopped_before_start")
        return 0
    # SIGUSR1: the next checkpoint is a full one (a model on a frozen base publishes deltas otherwise).
    signal.signal(signal.SIGUSR1, lambda *_: trainer.session.request_full())
    trainer.run(stop)
    return 0


def cmd_optimize(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Run the optimize role until SIGTERM or Ctrl-C."""
    from .optimize.role import Optimizer

    _check_topics("optimize", settings)
    Optimizer(settings, metrics=metrics).run(_stop_on_signals())
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Joiner and trainer in one process, each in its own thread, stopped together."""
    from .join.joiner import Joiner
    from .learn.trainer import Trainer
    from .util.retry import Stopped

    _check_topics("run", settings)
    stop = _stop_on_signals()
    try:
        trainer = Trainer(settings, metrics=metrics, stop=stop)
    except Stopped:
        log.info("trainer_stopped_before_start")
        return 0
    joiner = Joiner(settings, metrics=metrics)
    failures: list[BaseException] = []

    def run_role(role: Joiner | Trainer) -> None:
        try:
            role.run(stop)
        except Stopped:
            pass
        except BaseException as exc:
            failures.append(exc)
            raise

    threads = [
        threading.Thread(target=run_role, args=(role,), name=name)
        for name, role in (("joiner", joiner), ("trainer", trainer))
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
        if not all(t.is_alive() for t in threads):
            stop.set()  # one role died: stop the other rather than run half a pipeline
    if failures:
        raise failures[0]  # reported by main(), exit non-zero
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Write a new Ed25519 key pair: the trainer keeps the private key, serving nodes the public one.

    Never over existing keys: replacing the pair would make every serving
    node refuse the trainer's next checkpoints.
    """
    import os

    from .checkpoint.signing import generate_keypair

    private_path, public_path = args.out / "signing.pem", args.out / "signing.pub.pem"
    if existing := [str(p) for p in (private_path, public_path) if p.exists()]:
        print(
            f"stream-learner keys: {' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''};"
            f" nothing written. Serving nodes trust the public key of the pair, so a new pair means giving"
            f" them the new public key: move the old files away first, or use another --out.",
            file=sys.stderr,
        )
        return 1
    private_pem, public_pem = generate_keypair()
    written: list[Path] = []
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        # O_EXCL: a concurrent run cannot make us overwrite what it just wrote.
        for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except OSError as exc:
        for path in written:  # half a pair is no pair
            path.unlink(missing_ok=True)
        print(f"stream-learner keys: cannot write the keys to {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(json.dumps({"private_key": str(private_path), "public_key": str(public_path)}))
    return 0


def cmd_local(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """``local up`` starts servers in the background; ``local down`` stops them."""
    from .local import LocalServers, stop_from_state, write_state

    if args.action == "down":
        stopped = stop_from_state(args.state_file)
        print("stopped" if stopped else f"nothing recorded in {args.state_file}")
        return 0
    if args.state_file.exists():
        print(f"already up (see {args.state_file}); run 'stream-learner local down' first", file=sys.stderr)
        return 1
    servers = LocalServers(settings).start()
    write_state(args.state_file, servers)
    print(f"export {env_name('bootstrap_servers')}={servers.bootstrap_servers}")
    print(f"export {env_name('redis_url')}={servers.redis_url}")
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Create the topics of docs/architecture.md that do not exist yet."""
    from .bus import ensure_topics

    created = ensure_topics(settings)
    print(json.dumps({"created": created}))
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Print the effective settings with secrets masked; with ``--show-origin``, where each comes from."""
    shown = settings.redacted()
    if args.show_origin:
        origins: dict[str, str] = args.origins
        print(
            json.dumps({field: {"value": value, "origin": origins[field]} for field, value in shown.items()}, indent=2)
        )
    else:
        print(json.dumps(shown, indent=2))
    return 0


_MODELS_ARGS = {"list": 0, "show": 1, "alias": 3, "pin": 2, "unpin": 1, "rollback": 1}


def cmd_models(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """``stream-learner models ...``: print what the topic holds, or write one signed registry record (JSON out)."""
    from .checkpoint import catalog
    from .checkpoint.errors import CheckpointError
    from .checkpoint.signing import load_private_key, load_public_key

    action, names = args.action, list(args.names)
    if len(names) != _MODELS_ARGS[action]:
        print(
            f"stream-learner models {action}: {_MODELS_ARGS[action]} argument(s) expected, got {names}", file=sys.stderr
        )
        return 2
    try:
        key = load_private_key(settings.trainer_signing_key) if settings.trainer_signing_key else None
        if action in ("list", "show"):
            keys = [load_public_key(p) for p in settings.serving_public_keys]
            if key is not None:
                keys.append(key.public_key())
            if not keys:
                print("stream-learner models: give serving_public_keys (or trainer_signing_key)", file=sys.stderr)
                return 2
            found = catalog.catalog(settings, keys)
            out = catalog.list_models(found) if action == "list" else catalog.show_model(found, names[0])
            print(json.dumps(out, indent=2))
            return 0
        if key is None:
            print(
                f"stream-learner models {action}: registry records are signed: give trainer_signing_key",
                file=sys.stderr,
            )
            return 2
        model = names[0]
        if action == "alias":
            written = catalog.set_alias(settings, key, model, names[1], _version(names[2]))
        elif action == "pin":
            written = catalog.pin(settings, key, model, _version(names[1]))
        elif action == "unpin":
            written = catalog.unpin(settings, key, model)
        else:
            written = catalog.rollback(settings, key, model, alias=args.alias, to=args.to)
    except (CheckpointError, ValueError) as exc:
        print(f"stream-learner models {action}: {exc}", file=sys.stderr)
        return 1
    record = written.record
    print(
        json.dumps(
            {
                "model": record.model,
                "seq": record.seq,
                "change": record.change,
                "aliases": record.aliases,
                "pin": record.pin,
                "offset": written.offset,
            }
        )
    )
    return 0


def _version(text: str) -> int:
    version = int(text)
    if version < 1:
        raise ValueError(f"a version is a positive integer, got {text}")
    return version


def cmd_replay(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Replay a closed range (see :mod:`stream_learner.replay`), resumable; print the comparison with live."""
    from .replay.cli import run

    return run(args, settings)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


#: Verbs that do one thing and exit: no metrics server (its port may be a running role's).
ONE_SHOT_VERBS = frozenset({"config", "keys", "local", "topics", "models"})

#: The metric families each verb exports (:data:`stream_learner.metrics.ROLES`); other verbs: all.
VERB_METRICS: dict[str, tuple[str, ...]] = {
    "joiner": ("joiner",),
    "trainer": ("trainer",),
    "run": ("joiner", "trainer"),
    "serve": ("serving", "sdk"),
    "optimize": ("optimize",),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stream-learner`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings, args.origins = load_settings_with_origins(
            config_file=getattr(args, "config", None), flags={f: getattr(args, f, None) for f in FIELDS}
        )
    except StreamLearnerError as exc:
        print(f"stream-learner: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from .health import Health

    metrics = Metrics(roles=VERB_METRICS.get(args.command), health=Health(settings.health_stall_s))
    for role in set(VERB_METRICS.get(args.command, ())) - {"sdk"}:
        metrics.health.expect(role)  # /health: 503 "starting" until the role reports
    if settings.metrics_port is not None and args.command not in ONE_SHOT_VERBS:
        metrics.serve(settings.metrics_port)
        log.info("metrics_listening", port=settings.metrics_port, paths=["/metrics", "/health"])
    # SIGTERM (docker stop) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    func: Callable[[argparse.Namespace, Settings, Metrics], int] = args.func
    try:
        return func(args, settings, metrics)
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except StreamLearnerError as exc:
        log.error("failed", error=str(exc))
        return 1
    except Exception as exc:
        from .util.retry import dependency_failure

        what = dependency_failure(exc, settings)
        if what is None:
            raise
        log.error("permanent_error", error=what)  # one line: retrying would not cure it
        return 1


if __name__ == "__main__":
    sys.exit(main())
