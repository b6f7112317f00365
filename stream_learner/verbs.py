"""What each ``stream-learner`` verb does: one handler per verb, given the parsed arguments and settings.

:mod:`stream_learner.cli` parses and dispatches; each handler here imports
its implementation when it runs, so a verb loads only what it uses (the
joiner, say, never loads torch).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec
import structlog

from .config import Settings, env_name
from .metrics import Metrics

log = structlog.get_logger("stream_learner")

#: The topics each long-running verb reads or writes, checked at its start (see `_check_topics`).
VERB_TOPICS: dict[str, tuple[str, ...]] = {
    "joiner": ("predictions", "labels", "examples", "dlq"),
    "trainer": ("examples", "models", "drift", "dlq"),
    "run": ("predictions", "labels", "examples", "models", "drift", "dlq"),
    "serve": ("models", "predictions"),
    "optimize": ("examples", "models"),
}


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
    """Run the trainer until SIGTERM or Ctrl-C (a trainer started while its state store is down waits for it).

    With ``trainer_dist_world_size`` above 1 (and not already a rank: torchrun sets ``WORLD_SIZE``) this
    process is the launcher of that many rank processes (stream_learner.learn.ranks).
    """
    from .errors import ConfigError
    from .learn.ranks import RankGroup, check_world, launch, launches_ranks
    from .learn.trainer import Trainer
    from .util.parent import watch_parent
    from .util.retry import Stopped

    _check_topics("trainer", settings)
    if launches_ranks(settings.trainer_dist_world_size):
        # Permanent errors fail here, once, not in every rank and every restart of the group.
        if not settings.trainer_signing_key:
            raise ConfigError("trainer_signing_key is not set: the trainer signs every checkpoint")
        check_world(
            settings.trainer_dist_world_size, _partitions(settings, settings.topic_examples), settings.topic_examples
        )
        return launch(settings.trainer_dist_world_size, settings.trainer_dist_max_restarts, args.argv)
    stop = _stop_on_signals()
    group = RankGroup.from_env(device=settings.trainer_device, timeout_s=settings.trainer_dist_timeout_s)
    if group is not None:
        watch_parent(stop)
    try:
        try:
            trainer = Trainer(settings, metrics=metrics, stop=stop, group=group)
        except Stopped:
            log.info("trainer_stopped_before_start")
            return 0
        # SIGUSR1: the next checkpoint is a full one (a model on a frozen base publishes deltas otherwise).
        signal.signal(signal.SIGUSR1, lambda *_: trainer.session.request_full())
        trainer.run(stop)
    finally:
        if group is not None:
            group.close()
    return 0


def _partitions(settings: Settings, topic: str) -> int:
    """How many partitions ``topic`` has (0 if the broker does not know it)."""
    from .bus import make_consumer

    consumer = make_consumer(settings, group_id=None)
    try:
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()


def cmd_optimize(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Run the optimize role until SIGTERM or Ctrl-C."""
    from .optimize.role import Optimizer

    _check_topics("optimize", settings)
    Optimizer(settings, metrics=metrics).run(_stop_on_signals())
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings, metrics: Metrics) -> int:
    """Joiner and trainer together, stopped together: the joiner in a child process of its own
    (``run_joiner_process``, the default: two interpreter locks, two cores) or a thread of this one."""
    from .learn.trainer import Trainer
    from .util.retry import Stopped

    _check_topics("run", settings)
    stop = _stop_on_signals()
    child = _start_joiner_process(settings, metrics) if settings.run_joiner_process else None
    try:
        try:
            trainer = Trainer(settings, metrics=metrics, stop=stop)
        except Stopped:
            log.info("trainer_stopped_before_start")
            return 0
        roles: list[Any] = [trainer]
        if child is None:
            from .join.joiner import Joiner

            roles.append(Joiner(settings, metrics=metrics))
        failures: list[BaseException] = []

        def run_role(role: Any) -> None:
            try:
                role.run(stop)
            except Stopped:
                pass
            except BaseException as exc:
                failures.append(exc)
                raise

        threads = [threading.Thread(target=run_role, args=(r,), name=type(r).__name__.lower()) for r in roles]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.5)
            if not all(t.is_alive() for t in threads) or (child is not None and not child.is_alive()):
                stop.set()  # one role died: stop the other rather than run half a pipeline
        if failures:
            raise failures[0]  # reported by main(), exit non-zero
    finally:
        if child is not None:
            _stop_process(child)
    if child is not None and child.exitcode not in (0, -signal.SIGTERM):
        log.error("joiner_process_failed", exitcode=child.exitcode)
        return 1
    return 0


def _start_joiner_process(settings: Settings, metrics: Metrics) -> BaseProcess:
    """``run``'s joiner as a spawned child process; this process's /health follows whether it lives."""
    import multiprocessing

    port = None if settings.metrics_port is None else settings.metrics_port + 1
    child = multiprocessing.get_context("spawn").Process(
        target=joiner_process, args=(settings, port), name="stream-learner-joiner"
    )
    child.start()
    log.info("joiner_process_started", pid=child.pid, metrics_port=port)
    metrics.health.add_check(
        "joiner", lambda: (child.is_alive(), f"process {child.pid}" + ("" if child.is_alive() else " exited"))
    )
    return child


def _stop_process(child: BaseProcess, timeout_s: float = 30.0) -> None:
    """SIGTERM (the joiner finishes its cycle), SIGKILL after ``timeout_s`` (always safe for a joiner)."""
    if child.is_alive():
        child.terminate()
    child.join(timeout_s)
    if child.is_alive():
        child.kill()
        child.join(10)


def joiner_process(settings: Settings, port: int | None) -> None:
    """The body of ``run``'s joiner process: logs as the parent does, serves the joiner's metrics and
    /health on ``port``, stops on SIGTERM, Ctrl-C or its parent's death; a failure exits 1 with one line."""
    import sys

    from .errors import StreamLearnerError
    from .health import Health
    from .join.joiner import Joiner
    from .logging import configure_logging
    from .util.parent import watch_parent
    from .util.retry import Stopped, dependency_failure

    configure_logging(settings.log_level, settings.log_format)
    metrics = Metrics(roles=("joiner",), health=Health(settings.health_stall_s))
    metrics.health.expect("joiner")
    if port is not None:
        metrics.serve(port)
    stop = _stop_on_signals()
    watch_parent(stop)
    try:
        Joiner(settings, metrics=metrics).run(stop)
    except Stopped:
        log.info("joiner_stopped_while_waiting")
    except StreamLearnerError as exc:
        log.error("failed", role="joiner", error=str(exc))
        sys.exit(1)
    except Exception as exc:
        what = dependency_failure(exc, settings)
        if what is None:
            raise
        log.error("permanent_error", role="joiner", error=what)
        sys.exit(1)


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
