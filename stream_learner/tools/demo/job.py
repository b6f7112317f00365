"""The main job's orchestration: local servers, the ``run`` and ``serve`` processes, the traffic, the wait.

:func:`run_demo` starts Tansu and Valkey, a ``stream-learner run`` process
(joiner + trainer) and a ``stream-learner serve`` process (the reference
serving node), waits until the joiner has joined its group, plays the
simulated application (:mod:`.app`) against the node while watching the
topics (:mod:`.monitor`), waits until every event is accounted for and the
node serves the newest checkpoint, and writes the results (:mod:`.summary`,
:mod:`.report`).
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from ...config import Settings, settings_env
from ...errors import StreamLearnerError
from ...local import LocalServers, free_port
from ...sdk import PredictionLogger
from .app import FEATURES, MODEL, PROBE, Application, DemoConfig, Row, demo_rows
from .baseline import static_baseline
from .monitor import Monitor, Progress
from .report import report_html
from .summary import summarize
from .variants import read_log, replay_variants


def run_demo(base: Settings, config: DemoConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run the demo; return its summary (also written to ``config.out``)."""
    config = config or DemoConfig()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    rows = demo_rows(config)
    settings = msgspec.structs.replace(
        base,
        joiner_window_ms=config.window_ms,
        joiner_idle_timeout_ms=1000,
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        consumer_fetch_max_wait_ms=50,
        trainer_model=MODEL,
        trainer_features=FEATURES,
        trainer_classes=["0", "1"],
        # Freshness: a checkpoint a second by default, partial batches after 100 ms.
        trainer_checkpoint_every_s=config.checkpoint_every_s,
        trainer_max_wait_ms=100,
        serving_model=MODEL,
        log_format="json",  # also what the report reads the trainer's gate decisions from (run.log)
        # The trainer derives and gates the variants in its loop (the optimize role, a process of its
        # own, gated 6 of 29 versions in a short run here: at a version a second it falls behind).
        trainer_variants=list(config.variants),
        # What deriving costs, cut to what a version a second allows (with 0.05 s of timing, two passes
        # over 1000 examples and the decision at the next save, a version cost the trainer ~0.5 s: in a
        # full run here it fell behind and freshness p50 went from 1.0 s to 7.4 s; with these, 1.5 s):
        # - the gate's timing: the demo's model answers in ~0.03 ms, so 0.02 s per batch size is still
        #   ~300 timed rounds at batch 1 for each p50 (default 0.3 s);
        # - the fine-tune (sparse): one pass over the last 500 examples, ~1.5 s of traffic, the newest
        #   versions' (default two passes over 2000, ~6 s, reaching back across the drift);
        # - the decision after 250 held-out labeled examples (~1 s of traffic), not at the next
        #   version's save, where it would delay every checkpoint (default 1000: never reached here).
        variant_latency_budget_s=0.02,
        variant_window=500,
        variant_finetune_epochs=1,
        variant_heldout_examples=250,
    )
    work = Path(tempfile.mkdtemp(prefix="stream-learner-demo-"))  # keys, trainer state, node floor: fresh each run
    try:
        return _run_in(work, settings, config, rows, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the private signing key goes with it


def _run_in(work: Path, settings: Settings, config: DemoConfig, rows: list[Row], progress: bool) -> dict[str, Any]:
    out = config.out
    with LocalServers(settings, workdir=work / "servers") as servers:
        from ...checkpoint.signing import generate_keypair

        private_pem, public_pem = generate_keypair()
        (work / "signing.pem").write_bytes(private_pem)
        (work / "signing.pub.pem").write_bytes(public_pem)
        settings = msgspec.structs.replace(
            servers.settings,
            trainer_signing_key=str(work / "signing.pem"),
            trainer_state_dir=str(work / "trainer-state"),
            # The node's floor and registry state belong to this run's topic: one left in the working
            # directory by an earlier run (a floor of v27, say) would refuse this run's v1..v26.
            serving_state_dir=str(work / "serving-state"),
            serving_public_keys=[str(work / "signing.pub.pem")],
            serving_port=(port := free_port()),
        )
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(_start(["run"], settings, out / "run.log"))
            procs.append(_start(["serve", "--cold-start"], settings, out / "serve.log"))
            return _play(settings, config, rows, port, procs, progress)
        finally:
            for proc in procs:
                _stop(proc)


def _start(args: Sequence[str], settings: Settings, logfile: Path) -> subprocess.Popen[bytes]:
    with logfile.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_learner.cli", *args],
            env=settings_env(settings),
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _wait_ready(port: int, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise StreamLearnerError(f"{proc.args!r} exited with {proc.returncode}; see its log")
        try:
            if _get(port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise StreamLearnerError(f"the serving node did not become ready in {timeout_s:.0f} s")


def _play(
    settings: Settings,
    config: DemoConfig,
    rows: list[Row],
    port: int,
    procs: Sequence[subprocess.Popen[bytes]],
    progress: bool,
) -> dict[str, Any]:
    _wait_ready(port, procs)
    monitor = Monitor(settings)
    monitor.start()
    sdk = PredictionLogger(settings=settings, model=MODEL)
    try:
        _warm_up(sdk, monitor, procs)
        return _traffic(settings, config, rows, port, monitor, sdk, progress)
    finally:  # already done on success; on an error, do not leave them running
        monitor.stop.set()
        sdk.close()


def _traffic(
    settings: Settings,
    config: DemoConfig,
    rows: list[Row],
    port: int,
    monitor: Monitor,
    sdk: PredictionLogger,
    progress: bool,
) -> dict[str, Any]:
    app = Application(config, rows, port, sdk)
    app.start()
    reporter = Progress(config, app.served, monitor, app.t0, app.drift_time, enabled=progress)
    reporter.start()
    app.finish()
    sdk.flush()
    # Let the tail be joined, trained on and served: every prediction's
    # labeled/unlabeled example and every label's labeled/late one out, the
    # newest checkpoint covering them all, and the node serving it.
    answered = sum(x is not None for x in app.served)
    deadline = time.monotonic() + 30
    complete = False
    while time.monotonic() < deadline and not (
        complete := _caught_up(monitor, port, answered, len(app.labels.sent_at))
    ):
        time.sleep(0.5)
    reporter.stop.set()
    reporter.join()
    monitor.stop.set()
    monitor.join()
    sdk.close()
    _, model_info = _get(port, "/model")
    baseline = static_baseline(settings, rows, app.served, config.drift_index)
    variants = replay_variants(
        settings,
        rows,
        app.served,
        config.variants,
        monitor.seen.variants,
        read_log(config.out / "run.log"),
        app.t0,
    )
    summary = summarize(
        config,
        app.served,
        app.failures,
        monitor.seen,
        app.labels.sent_at,
        model_info,
        app.t0,
        app.drift_wall,
        sdk.stats,
        baseline,
        variants,
    )
    summary["complete"] = complete
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (config.out / "report.html").write_text(
        report_html(config, app.served, app.t0, app.drift_wall, summary, baseline, variants)
    )
    return summary


def _warm_up(
    sdk: PredictionLogger, monitor: Monitor, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 60.0
) -> None:
    """Wait until the joiner has joined its group: a probe request comes out joined.

    A consumer group's first join can take seconds (on Tansu, the rebalance
    timeout); traffic sent before it would be served by the cold-start model
    for that long, which says nothing about the system.
    """
    sdk.log_prediction("probe", {}, {"0": 0.5, "1": 0.5}, model=PROBE, model_version="0")
    sdk.log_label("probe", "0", model=PROBE)
    deadline = time.monotonic() + timeout_s
    while not monitor.seen.probed:
        if time.monotonic() > deadline:
            raise StreamLearnerError(f"the joiner joined no probe within {timeout_s:.0f} s; see run.log")
        for proc in procs:
            if proc.poll() is not None:
                raise StreamLearnerError(f"{proc.args!r} exited with {proc.returncode}; see its log")
        time.sleep(0.1)


def _caught_up(monitor: Monitor, port: int, predictions: int, labels: int) -> bool:
    with monitor.lock:
        seen = monitor.seen
        kinds = seen.examples
        newest = max(seen.manifests.values(), key=lambda m: m.version, default=None)
        # Distinct examples: one labeled-or-unlabeled per prediction, one labeled-or-late per label.
        if (
            newest is None
            or kinds["labeled"] + kinds["unlabeled"] != predictions
            or kinds["labeled"] + kinds["late"] != labels
        ):
            return False
        # Offsets are the next to apply, per examples partition: the newest
        # checkpoint covers every example the monitor has read.
        applied = {s.partition: s.offset for s in newest.input_offsets}
        if any(applied.get(p, 0) < end for p, end in seen.examples_end.items()):
            return False
    try:
        return bool(_get(port, "/health")[1].get("version") == newest.version)
    except OSError:
        return False
