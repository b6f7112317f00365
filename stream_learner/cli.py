"""The ``stream-learner`` command: one entry point, one sub-command per role.

Each sub-command takes the settings it uses as flags (``--bootstrap-servers``,
``--redis-url``, ...; :data:`~stream_learner.cli_settings.VERB_SETTINGS`) plus ``--config FILE``, and its
``--help`` lists just those, each with its meaning and default, taken from
the field docs of :class:`~stream_learner.config.Settings`. The environment
and the TOML file may hold any setting (one file for every role). Logging is
configured here, once. The handlers are in :mod:`stream_learner.verbs`; each
imports its implementation when it runs, so a verb loads only what it runs
(the joiner, say, never loads torch).
"""

from __future__ import annotations

import argparse
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from . import verbs
from .cli_settings import VERB_SETTINGS, VerbParser, settings_parser, verb_fields
from .config import (
    FIELDS,
    Settings,
    env_name,
    flag_name,
    load_settings_with_origins,
)
from .errors import StreamLearnerError
from .logging import configure_logging
from .metrics import Metrics

log = structlog.get_logger("stream_learner")

DEFAULT_STATE = Path(".stream-learner/local.json")


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    # Replay's module imports the learner, hence torch and River.
    from .replay.cli import add_arguments

    add_arguments(parser)


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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=VerbParser)

    def common(verb: str) -> list[VerbParser]:
        return [settings_parser(verb)]

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
    demo.set_defaults(func=verbs.cmd_demo)

    smoke = sub.add_parser(
        "smoke", parents=common("smoke"), help="count check on local servers: SDK -> decoder/DLQ -> joiner -> trainer"
    )
    smoke.add_argument("--events", type=int, default=20_000, help="predictions to send")
    smoke.set_defaults(func=verbs.cmd_smoke)

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
    serve.set_defaults(func=verbs.cmd_serve)

    joiner = sub.add_parser(
        "joiner", parents=common("joiner"), help="join predictions and labels into examples (consumer group)"
    )
    joiner.set_defaults(func=verbs.cmd_joiner)

    trainer = sub.add_parser(
        "trainer",
        parents=common("trainer"),
        help="train the model online from the examples topic and publish checkpoints",
    )
    trainer.set_defaults(func=verbs.cmd_trainer)

    optimize = sub.add_parser(
        "optimize",
        parents=common("optimize"),
        help="derive gated serving variants (int8, pruned, sparse) of each new model version",
    )
    optimize.set_defaults(func=verbs.cmd_optimize)

    run = sub.add_parser("run", parents=common("run"), help="joiner and trainer in one process (small deployments)")
    run.set_defaults(func=verbs.cmd_run)

    keys = sub.add_parser("keys", parents=common("keys"), help="checkpoint signing keys")
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("--out", type=Path, required=True, help="directory for signing.pem and signing.pub.pem")
    keys.set_defaults(func=verbs.cmd_keys)

    local = sub.add_parser("local", parents=common("local"), help="local Tansu + Valkey servers for development")
    local.add_argument("action", choices=["up", "down"])
    local.add_argument("--state-file", type=Path, default=DEFAULT_STATE)
    local.set_defaults(func=verbs.cmd_local)

    topics = sub.add_parser("topics", parents=common("topics"), help="create the topics that do not exist yet")
    topics.add_argument("action", choices=["create"])
    topics.set_defaults(func=verbs.cmd_topics)

    config = sub.add_parser("config", parents=common("config"), help="print the effective settings (secrets masked)")
    config.add_argument(
        "--show-origin", action="store_true", help="also say where each value comes from: default, env, file or flag"
    )
    config.set_defaults(func=verbs.cmd_config)

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
    models.set_defaults(func=verbs.cmd_models)

    replay = sub.add_parser(
        "replay",
        parents=common("replay"),
        arguments_from=_replay_arguments,
        help="re-run join and training over a closed range of the topics into a new lineage",
    )
    replay.set_defaults(func=verbs.cmd_replay)

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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a trainer's launcher gives its ranks
    try:
        settings, args.origins = load_settings_with_origins(
            config_file=getattr(args, "config", None), flags={f: getattr(args, f, None) for f in FIELDS}
        )
    except StreamLearnerError as exc:
        print(f"stream-learner: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from .health import Health

    roles = VERB_METRICS.get(args.command)
    if args.command == "run" and settings.run_joiner_process:
        roles = ("trainer",)  # the joiner's families are its own process's (metrics_port + 1)
    metrics = Metrics(roles=roles, health=Health(settings.health_stall_s))
    for role in set(roles or ()) - {"sdk"}:
        metrics.health.expect(role)  # /health: 503 "starting" until the role reports
    port = settings.metrics_port
    if args.command == "trainer":  # the ranks of a data-parallel trainer serve on port + rank
        from .learn.ranks import rank_metrics_port

        port = rank_metrics_port(port, settings.trainer_dist_world_size)
    if port is not None and args.command not in ONE_SHOT_VERBS:
        metrics.serve(port)
        log.info("metrics_listening", port=port, paths=["/metrics", "/health"])
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
