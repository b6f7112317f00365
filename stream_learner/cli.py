"""The ``stream-learner`` command: one entry point, one sub-command per role.

Every sub-command takes every setting as a flag (``--bootstrap-servers``,
``--redis-url``, ...) plus ``--config FILE``; see :mod:`stream_learner.config`.
Logging is configured here, once. Each verb imports its implementation in its
handler, so a verb loads only what it runs (the joiner, say, never loads torch).
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

from .config import FIELDS, Settings, env_name, flag_name, load_settings
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

    def __init__(self, *args: typing.Any, arguments_from: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self._arguments_from = arguments_from

    def _complete(self) -> None:
        if self._arguments_from is not None:
            add, self._arguments_from = self._arguments_from, None
            add(self)

    def parse_known_args(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        self._complete()
        return super().parse_known_args(*args, **kwargs)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    # Replay's module imports the learner, hence torch and River.
    from .replay.cli import add_arguments

    add_arguments(parser)


def _settings_parser() -> _Parser:
    parent = _Parser(add_help=False)
    parent.add_argument("--config", metavar="FILE", help="TOML settings file (flags override it)")
    group = parent.add_argument_group("settings (each also STREAM_LEARNER_<NAME> or a TOML key)")
    hints = typing.get_type_hints(Settings)
    for field in FIELDS:
        # Flags default to None so only the ones given override env and TOML.
        if hints[field] is bool:
            group.add_argument(flag_name(field), dest=field, default=None,
                               action=argparse.BooleanOptionalAction, help=f"env {env_name(field)}")
        else:
            group.add_argument(flag_name(field), dest=field, default=None, metavar="VALUE",
                               help=f"env {env_name(field)}")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stream-learner`` command."""
    common = _settings_parser()
    parser = argparse.ArgumentParser(prog="stream-learner", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", parents=[common],
                          help="the main job: local servers, a serving node, a drifting application, "
                               "the pipeline learning live; writes a report")
    # The defaults are DemoConfig's, applied in cmd_demo: importing it here would load the demo for every verb.
    demo.add_argument("--rate", type=float, help="requests per second")
    demo.add_argument("--seconds", type=float, help="seconds of traffic")
    demo.add_argument("--out", type=Path, help="directory for the report")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--quiet", action="store_true", help="no live progress line")
    demo.set_defaults(func=cmd_demo)

    smoke = sub.add_parser("smoke", parents=[common],
                           help="count check on local servers: SDK -> decoder/DLQ -> joiner -> trainer")
    smoke.add_argument("--events", type=int, default=20_000, help="predictions to send")
    smoke.set_defaults(func=cmd_smoke)

    serve = sub.add_parser("serve", parents=[common],
                           help="the reference serving node: HTTP predict, hot-swapped verified checkpoints")
    serve.add_argument("--cold-start", action="store_true",
                       help="until the first checkpoint arrives, serve an untrained model built from the "
                            "trainer_* settings, as version 0")
    serve.set_defaults(func=cmd_serve)

    joiner = sub.add_parser("joiner", parents=[common],
                            help="join predictions and labels into examples (consumer group)")
    joiner.set_defaults(func=cmd_joiner)

    trainer = sub.add_parser("trainer", parents=[common],
                             help="train the model online from the examples topic and publish checkpoints")
    trainer.set_defaults(func=cmd_trainer)

    run = sub.add_parser("run", parents=[common], help="joiner and trainer in one process (small deployments)")
    run.set_defaults(func=cmd_run)

    keys = sub.add_parser("keys", parents=[common], help="checkpoint signing keys")
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("--out", type=Path, required=True, help="directory for signing.pem and signing.pub.pem")
    keys.set_defaults(func=cmd_keys)

    local = sub.add_parser("local", parents=[common], help="local Tansu + Valkey servers for development")
    local.add_argument("action", choices=["up", "down"])
    local.add_argument("--state-file", type=Path, default=DEFAULT_STATE)
    local.set_defaults(func=cmd_local)

    topics = sub.add_parser("topics", parents=[common], help="create the topics that do not exist yet")
    topics.add_argument("action", choices=["create"])
    topics.set_defaults(func=cmd_topics)

    config = sub.add_parser("config", parents=[common], help="print the effective settings (secrets masked)")
    config.set_defaults(func=cmd_config)

    replay = sub.add_parser("replay", parents=[common], arguments_from=_replay_arguments,
                            help="re-run join and training over a closed range of the topics into a new lineage")
    replay.set_defaults(func=cmd_replay)
    return parser


def cmd_demo(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """The main job (see :mod:`stream_learner.tools.demo`); print its summary, exit 0 if nothing failed."""
    from .tools.demo import DemoConfig, describe, run_demo

    given = {name: value for name in ("rate", "seconds", "out", "seed") if (value := getattr(args, name)) is not None}
    config = DemoConfig(**given)
    summary = run_demo(settings, config, progress=not args.quiet)
    if not args.quiet:
        print(describe(summary), file=sys.stderr)
    print(json.dumps(summary, indent=2))
    failed = (summary["requests"]["failed"] or summary["labels"]["sdk_failed"] or summary["labels"]["sdk_dropped"]
              or not summary["checkpoints"]["swaps_at_node"] or not summary["complete"])
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Run the serving node until SIGTERM or Ctrl-C."""
    from .node import run_node

    run_node(settings, metrics, cold_start=args.cold_start, stop=_stop_on_signals())
    return 0


def cmd_smoke(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """The count check (see :mod:`stream_learner.tools.smoke`): print its summary, exit 0 if every count matches."""
    from .local import LocalServers
    from .tools.smoke import run_smoke

    # Short windows and idle timeout: the check's traffic stops after a few seconds.
    short = msgspec.structs.replace(
        settings, joiner_window_ms=2000, joiner_idle_timeout_ms=1000,
        consumer_session_timeout_ms=6000, consumer_max_poll_interval_ms=3000,
    )
    with LocalServers(short) as servers:
        summary = run_smoke(servers.settings, events=args.events, metrics=metrics)
    print(json.dumps(summary, indent=2))
    ok = summary["lost"] == 0 and summary["sdk_failed"] == 0 and all(
        summary["examples_joined"].get(k, 0) == n for k, n in summary["examples_expected"].items())
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

    Joiner(settings, metrics=metrics).run(_stop_on_signals())
    return 0


def cmd_trainer(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Run the trainer until SIGTERM or Ctrl-C (a trainer started while its state store is down waits for it)."""
    from .learn.trainer import Trainer
    from .util.retry import Stopped

    stop = _stop_on_signals()
    try:
        trainer = Trainer(settings, metrics=metrics, stop=stop)
    except Stopped:
        log.info("trainer_stopped_before_start")
        return 0
    trainer.run(stop)
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Joiner and trainer in one process, each in its own thread, stopped together."""
    from .join.joiner import Joiner
    from .learn.trainer import Trainer
    from .util.retry import Stopped

    stop = _stop_on_signals()
    try:
        trainer = Trainer(settings, metrics=metrics, stop=stop)
    except Stopped:
        log.info("trainer_stopped_before_start")
        return 0
    joiner = Joiner(settings, metrics=metrics)
    threads = [threading.Thread(target=role.run, args=(stop,), name=name)
               for name, role in (("joiner", joiner), ("trainer", trainer))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
        if not all(t.is_alive() for t in threads):
            stop.set()  # one role died: stop the other rather than run half a pipeline
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Write a new Ed25519 key pair: the trainer keeps the private key, serving nodes the public one."""
    import os

    from .checkpoint.signing import generate_keypair

    private_pem, public_pem = generate_keypair()
    args.out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = args.out / "signing.pem", args.out / "signing.pub.pem"
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
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
    """Print the effective settings with secrets masked."""
    print(json.dumps(settings.redacted(), indent=2))
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Replay a closed range (see :mod:`stream_learner.replay`), resumable; print the comparison with live."""
    from .replay.cli import run

    return run(args, settings)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stream-learner`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(config_file=args.config, flags={f: getattr(args, f) for f in FIELDS})
    except StreamLearnerError as exc:
        print(f"stream-learner: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    metrics = Metrics()
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port)
        log.info("metrics_listening", port=settings.metrics_port)
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


if __name__ == "__main__":
    sys.exit(main())
