"""The main job: the whole loop on local servers, with a drift, measured from the outside.

:func:`run_demo` starts Tansu and Valkey, a ``stream-learner run`` process
(joiner + trainer) and a ``stream-learner serve`` process (the reference
serving node), then plays a simulated application against the node over
HTTP: requests come from River's Agrawal generator whose concept changes
abruptly at a known request (classification function 0 -> 2); the true label
of each request is sent later, after a random delay, and for a fraction of
requests never. The node serves the newest verified checkpoint it has and
logs each prediction with the version that served it; the joiner joins
predictions with labels; the trainer learns and publishes checkpoints; the
node hot-swaps them. The application scores every response against the
truth, so the served accuracy it reports is what users would have seen.

A monitor reads the examples, model and drift topics to report the join by
kind, the checkpoints, when the drift was detected, and the freshness of
each label: from the moment the application sent it to the moment the node
served a model whose manifest says it trained on that label's example.

Writes ``summary.json`` and ``report.html`` (an SVG plot of served accuracy
over time marked with the drift, its detection and the model versions) to
the output directory.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import math
import random
import signal
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog
from kafka import TopicPartition

from .bus import make_consumer
from .checkpoint.publish import H_TYPE, TYPE_MANIFEST
from .config import Settings, settings_env
from .errors import EventError, StreamLearnerError
from .events import DRIFT, EXAMPLE, MANIFEST
from .local import LocalServers, free_port
from .sdk import PredictionLogger

log = structlog.get_logger(__name__)

FEATURES = ["salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan"]
MODEL = "demo"
PROBE = "demo-probe"  # the warm-up request's model: the trainer skips it as another model's


@dataclass(frozen=True)
class DemoConfig:
    """What the simulated application does. Defaults take about 80 s here."""

    rate: float = 400.0  # requests per second
    seconds: float = 60.0  # of traffic
    drift_at: float = 0.5  # the fraction of requests served before the concept changes
    label_missing: float = 0.10  # never labeled
    label_late: float = 0.05  # labeled after the join window closed
    label_delay_s: tuple[float, float] = (0.05, 1.2)  # the others' delay, uniform
    window_ms: int = 2000  # the joiner's label window
    clients: int = 2  # concurrent application threads
    seed: int = 7
    out: Path = Path("demo-report")

    @property
    def requests(self) -> int:
        """How many requests the application sends."""
        return int(self.rate * self.seconds)

    @property
    def drift_index(self) -> int:
        """The first request drawn from the new concept."""
        return int(self.requests * self.drift_at)


def demo_rows(config: DemoConfig) -> list[tuple[dict[str, float], int]]:
    """The requests and their true classes: Agrawal function 0, then function 2 from the drift on."""
    from river.datasets import synth

    before = synth.Agrawal(classification_function=0, seed=config.seed)
    after = synth.Agrawal(classification_function=2, seed=config.seed + 1)
    rows = list(itertools.islice(before, config.drift_index))
    rows += itertools.islice(after, config.requests - config.drift_index)
    return [({k: float(v) for k, v in x.items()}, int(y)) for x, y in rows]


@dataclass
class Served:
    """What the application saw for one request."""

    sent_at: float
    version: int
    correct: bool


@dataclass
class Observed:
    """What the monitor read from the topics."""

    examples: Counter[str] = field(default_factory=Counter)
    example_at: dict[str, tuple[int, int]] = field(default_factory=dict)  # label event id -> (partition, offset)
    examples_end: dict[int, int] = field(default_factory=dict)  # partition -> one past the last example read
    manifests: dict[int, Any] = field(default_factory=dict)  # version -> manifest
    drift: list[Any] = field(default_factory=list)
    probed: bool = False  # the warm-up probe came out of the joiner
    example_ids: set[str] = field(default_factory=set)
    duplicates: int = 0  # examples re-emitted (at-least-once), not counted again


class _Monitor(threading.Thread):
    """Reads the examples, model and drift topics from the beginning until stopped."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="demo-monitor", daemon=True)
        self.settings = settings
        self.seen = Observed()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        s = self.settings
        consumer = make_consumer(s, None)
        tps = [TopicPartition(t, p) for t in (s.topic_examples, s.topic_models, s.topic_drift)
               for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        try:
            while not self.stop.is_set():
                for tp, records in consumer.poll(timeout_ms=200).items():
                    with self.lock:
                        for r in records:
                            self._take(tp.topic, r)
        finally:
            consumer.close()

    def _take(self, topic: str, record: Any) -> None:
        s, seen = self.settings, self.seen
        try:
            if topic == s.topic_examples:
                ex = EXAMPLE.decode(record.value)
                seen.examples_end[record.partition] = record.offset + 1
                if ex.model == PROBE:
                    seen.probed = True
                    return
                # At-least-once: a re-emitted example (same id) counts once, and apart.
                if ex.example_id in seen.example_ids:
                    seen.duplicates += 1
                    return
                seen.example_ids.add(ex.example_id)
                seen.examples[ex.kind] += 1
                if ex.label_event_id is not None:
                    seen.example_at[ex.label_event_id] = (record.partition, record.offset)
            elif topic == s.topic_models:
                if dict(record.headers or ()).get(H_TYPE) == TYPE_MANIFEST:
                    m = MANIFEST.decode(record.value)
                    seen.manifests[m.version] = m
            else:
                seen.drift.append(DRIFT.decode(record.value))
        except EventError as exc:  # the pipeline's own topics: would be a bug, so say it
            log.error("demo_monitor_bad_record", topic=topic, offset=record.offset, error=str(exc))


class _Labels(threading.Thread):
    """Sends each label when its delay is over, through the SDK, as an application would."""

    def __init__(self, sdk: PredictionLogger) -> None:
        super().__init__(name="demo-labels", daemon=True)
        self.sdk = sdk
        self.heap: list[tuple[float, str, str]] = []
        self.cond = threading.Condition()
        self.sent_at: dict[str, float] = {}  # label event id -> when it was sent
        self.done = False

    def schedule(self, due: float, request_id: str, label: str) -> None:
        with self.cond:
            heapq.heappush(self.heap, (due, request_id, label))
            self.cond.notify()

    def finish(self) -> None:
        """Send what is scheduled, then stop."""
        with self.cond:
            self.done = True
            self.cond.notify()
        self.join()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.heap and not self.done:
                    self.cond.wait()
                if not self.heap:
                    return
                due, request_id, label = self.heap[0]
                wait = due - time.time()
                if wait > 0:
                    self.cond.wait(wait)
                    continue
                heapq.heappop(self.heap)
            event_id = self.sdk.log_label(request_id, label, model=MODEL)
            if event_id is not None:
                self.sent_at[event_id] = time.time()


def run_demo(base: Settings, config: DemoConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run the demo; return its summary (also written to ``config.out``)."""
    config = config or DemoConfig()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    rows = demo_rows(config)
    settings = msgspec.structs.replace(
        base,
        joiner_window_ms=config.window_ms, joiner_idle_timeout_ms=1000,
        consumer_session_timeout_ms=6000, consumer_max_poll_interval_ms=3000, consumer_fetch_max_wait_ms=50,
        trainer_model=MODEL, trainer_features=FEATURES, trainer_classes=["0", "1"],
        # Freshness: a checkpoint a second (small model), partial batches after 100 ms.
        trainer_checkpoint_every_s=1.0, trainer_max_wait_ms=100,
        serving_model=MODEL, log_format="json",
    )
    work = Path(tempfile.mkdtemp(prefix="stream-learner-demo-"))  # keys and trainer state: fresh each run
    try:
        return _run_in(work, settings, config, rows, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the private signing key goes with it


def _run_in(work: Path, settings: Settings, config: DemoConfig, rows: list[tuple[dict[str, float], int]],
            progress: bool) -> dict[str, Any]:
    out = config.out
    with LocalServers(settings, workdir=work / "servers") as servers:
        from .checkpoint.signing import generate_keypair

        private_pem, public_pem = generate_keypair()
        (work / "signing.pem").write_bytes(private_pem)
        (work / "signing.pub.pem").write_bytes(public_pem)
        settings = msgspec.structs.replace(
            servers.settings, trainer_signing_key=str(work / "signing.pem"),
            trainer_state_dir=str(work / "trainer-state"),
            serving_public_keys=[str(work / "signing.pub.pem")], serving_port=(port := free_port()),
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
        return subprocess.Popen([sys.executable, "-m", "stream_learner.cli", *args], env=settings_env(settings),
                                stdout=f, stderr=subprocess.STDOUT)


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
                raise StreamLearnerError(f"{proc.args} exited with {proc.returncode}; see its log")
        try:
            if _get(port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise StreamLearnerError(f"the serving node did not become ready in {timeout_s:.0f} s")


def _play(settings: Settings, config: DemoConfig, rows: list[tuple[dict[str, float], int]], port: int,
          procs: Sequence[subprocess.Popen[bytes]], progress: bool) -> dict[str, Any]:
    _wait_ready(port, procs)
    monitor = _Monitor(settings)
    monitor.start()
    sdk = PredictionLogger(settings=settings, model=MODEL)
    try:
        _warm_up(sdk, monitor, procs)
        return _traffic(settings, config, rows, port, monitor, sdk, progress)
    finally:  # already done on success; on an error, do not leave them running
        monitor.stop.set()
        sdk.close()


def _traffic(settings: Settings, config: DemoConfig, rows: list[tuple[dict[str, float], int]], port: int,
             monitor: _Monitor, sdk: PredictionLogger, progress: bool) -> dict[str, Any]:
    rng = random.Random(config.seed)
    fates = [rng.random() for _ in rows]
    delays = [rng.uniform(*config.label_delay_s) for _ in rows]
    late = config.window_ms / 1000
    late_delays = [rng.uniform(late * 1.5, late * 2.5) for _ in rows]
    served: list[Served | None] = [None] * len(rows)
    failures = Counter[str]()
    next_index = itertools.count()
    lock = threading.Lock()
    labels = _Labels(sdk)
    labels.start()
    t0 = time.time()
    drift_time: list[float] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            with lock:
                i = next(next_index)
            if i >= len(rows):
                break
            due = t0 + i / config.rate
            if (wait := due - time.time()) > 0:
                time.sleep(wait)
            if i == config.drift_index:
                drift_time.append(time.time())
            features, y = rows[i]
            request_id = f"req-{i}"
            try:
                conn.request("POST", "/predict", json.dumps({"request_id": request_id, "features": features}),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = json.loads(resp.read())
                if resp.status != 200:
                    with lock:
                        failures[f"http_{resp.status}"] += 1
                    continue
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with lock:
                    failures[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            probs = body["prediction"]
            served[i] = Served(time.time() - t0, int(body["model_version"]), int(max(probs, key=probs.get)) == y)
            fate = fates[i]
            if fate < config.label_missing:
                continue
            delay = late_delays[i] if fate < config.label_missing + config.label_late else delays[i]
            labels.schedule(time.time() + delay, request_id, str(y))
        conn.close()

    clients = [threading.Thread(target=client, name=f"demo-client-{n}", daemon=True) for n in range(config.clients)]
    for c in clients:
        c.start()
    reporter = _Progress(config, served, monitor, t0, drift_time, enabled=progress)
    reporter.start()
    for c in clients:
        c.join()
    labels.finish()
    sdk.flush()
    # Let the tail be joined, trained on and served: every prediction's
    # labeled/unlabeled example and every label's labeled/late one out, the
    # newest checkpoint covering them all, and the node serving it.
    answered = sum(x is not None for x in served)
    deadline = time.monotonic() + 30
    complete = False
    while time.monotonic() < deadline and not (complete := _caught_up(monitor, port, answered,
                                                                      len(labels.sent_at))):
        time.sleep(0.5)
    reporter.stop.set()
    reporter.join()
    monitor.stop.set()
    monitor.join()
    sdk.close()
    status, model_info = _get(port, "/model")
    summary = _summary(config, served, failures, monitor.seen, labels.sent_at, model_info, t0,
                       drift_time[0] if drift_time else None, sdk.stats)
    summary["complete"] = complete
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (config.out / "report.html").write_text(_report_html(config, served, monitor.seen, model_info, t0,
                                                         drift_time[0] if drift_time else None, summary))
    return summary


def _warm_up(sdk: PredictionLogger, monitor: _Monitor, procs: Sequence[subprocess.Popen[bytes]],
             timeout_s: float = 60.0) -> None:
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
                raise StreamLearnerError(f"{proc.args} exited with {proc.returncode}; see its log")
        time.sleep(0.1)


def _caught_up(monitor: _Monitor, port: int, predictions: int, labels: int) -> bool:
    with monitor.lock:
        seen = monitor.seen
        kinds = seen.examples
        newest = max(seen.manifests.values(), key=lambda m: m.version, default=None)
        # Distinct examples: one labeled-or-unlabeled per prediction, one labeled-or-late per label.
        if (newest is None or kinds["labeled"] + kinds["unlabeled"] != predictions
                or kinds["labeled"] + kinds["late"] != labels):
            return False
        # Offsets are the next to apply, per examples partition: the newest
        # checkpoint covers every example the monitor has read.
        applied = {s.partition: s.offset for s in newest.input_offsets}
        if any(applied.get(p, 0) < end for p, end in seen.examples_end.items()):
            return False
    try:
        return bool(_get(port, "/health")[1].get("model_version") == newest.version)
    except OSError:
        return False


class _Progress(threading.Thread):
    """One status line a second: requests, served accuracy, model version, drift."""

    def __init__(self, config: DemoConfig, served: list[Served | None], monitor: _Monitor, t0: float,
                 drift_time: list[float], *, enabled: bool) -> None:
        super().__init__(name="demo-progress", daemon=True)
        self.config, self.served, self.monitor, self.t0 = config, served, monitor, t0
        self.drift_time = drift_time
        self.enabled = enabled
        self.stop = threading.Event()
        self.tty = sys.stderr.isatty()

    def run(self) -> None:
        ticks = 0
        while not self.stop.wait(1.0):
            ticks += 1
            if self.enabled and (self.tty or ticks % 5 == 0):
                print(("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n",
                      file=sys.stderr, flush=True)
        if self.enabled and self.tty:
            print(file=sys.stderr)

    def line(self) -> str:
        """The current status line."""
        done = [s for s in self.served if s is not None]
        recent = done[-1000:]
        acc = sum(s.correct for s in recent) / len(recent) if recent else float("nan")
        drift_ms = self.drift_time[0] * 1000 if self.drift_time else None
        with self.monitor.lock:
            seen = self.monitor.seen
            examples = sum(seen.examples.values())
            # Label-free detectors also fire while the first model learns: only later ones count.
            drifts = [d for d in seen.drift if d.kind == "drift" and drift_ms is not None and d.event_time >= drift_ms]
        drift = "after the drift" if self.drift_time else "before the drift"
        if drifts:
            drift += f", detected by {drifts[0].detector}"
        version = done[-1].version if done else "-"
        return (f"[{time.time() - self.t0:5.1f}s] served {len(done):>6,}/{self.config.requests:,}  "
                f"examples {examples:>6,}  served acc (last 1k) {acc:.3f}  model v{version}  {drift}   ")


def _rolling(correct: Sequence[bool], window: int) -> list[float]:
    """Accuracy over the last ``window`` requests at each request (fewer at the start).

    >>> _rolling([True, False, True, True], 2)
    [1.0, 0.5, 0.5, 1.0]
    """
    out, total = [], 0
    for i, c in enumerate(correct):
        total += c
        if i >= window:
            total -= correct[i - window]
        out.append(total / min(i + 1, window))
    return out


def _quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``.

    >>> _quantile([3.0, 1.0, 2.0, 4.0], 0.5), _quantile([], 0.5)
    (2.0, None)
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _summary(config: DemoConfig, served: list[Served | None], failures: Counter[str], seen: Observed,
             label_sent_at: dict[str, float], model_info: dict[str, Any], t0: float, drift_wall: float | None,
             sdk_stats: Any) -> dict[str, Any]:
    answered = [(i, s) for i, s in enumerate(served) if s is not None]
    k = config.drift_index
    window = 500
    before = [s.correct for i, s in answered if k - 3000 <= i < k]
    after_all = [s for i, s in answered if i >= k]
    rolling_after = _rolling([s.correct for s in after_all], window)
    pre_acc = sum(before) / len(before) if before else float("nan")
    worst = min(rolling_after[window:], default=float("nan"))
    recovered_at = next((n for n, a in enumerate(rolling_after) if n >= window and a >= 0.95 * pre_acc), None)
    final = [s.correct for s in after_all[-3000:]]
    drifts = [d for d in seen.drift if d.kind == "drift"]
    detected = next((d for d in drifts if drift_wall is not None and d.event_time / 1000 >= drift_wall), None)
    # Freshness: label sent -> the node serves a version that trained on its example.
    swaps = sorted((s["at"], s["version"]) for s in model_info.get("swaps", []))
    covers = sorted(seen.manifests.items())
    fresh = []
    for event_id, sent in label_sent_at.items():
        where = seen.example_at.get(event_id)
        if where is None:
            continue
        p, o = where
        version = next((v for v, m in covers if any(src.partition == p and src.offset > o
                                                   for src in m.input_offsets)), None)
        if version is None:
            continue
        at = next((t for t, v in swaps if v >= version and t >= sent), None)
        if at is not None:
            fresh.append(at - sent)
    total = len(served)
    return {
        "requests": {"sent": total, "answered": len(answered), "failed": dict(failures)},
        "labels": {"sent": len(label_sent_at), "never_sent": total - len(label_sent_at),
                   "sdk_failed": sdk_stats.failed, "sdk_dropped": sdk_stats.dropped},
        "examples": {**{kind: seen.examples[kind] for kind in ("labeled", "unlabeled", "late")},
                     "duplicates": seen.duplicates},
        "join_rates": {kind: round(seen.examples[kind] / total, 4) for kind in ("labeled", "unlabeled", "late")},
        "served_accuracy": {
            "before_drift": round(pre_acc, 4),
            "worst_after_drift": round(worst, 4),
            "final": round(sum(final) / len(final), 4) if final else None,
            "recovered_to_95pct_after_requests": recovered_at,
            "rolling_window": window,
        },
        "drift": {
            "at_request": k,
            "at_s": round(drift_wall - t0, 2) if drift_wall else None,
            "detected_at_s": round(detected.event_time / 1000 - t0, 2) if detected else None,
            "detected_after_s": round(detected.event_time / 1000 - drift_wall, 2) if detected and drift_wall else None,
            "detector": detected.detector if detected else None,
            "drift_events": len(drifts),
            "warnings": sum(d.kind == "warning" for d in seen.drift),
        },
        "checkpoints": {"published": len(seen.manifests), "newest": max(seen.manifests, default=None),
                        "swaps_at_node": len(swaps),
                        "node_failures": model_info.get("status", {}).get("failures")},
        "freshness_s": {"labels": len(fresh), "p50": _round(_quantile(fresh, 0.5)),
                        "p99": _round(_quantile(fresh, 0.99))},
        "report": str(config.out / "report.html"),
    }


def describe(summary: dict[str, Any]) -> str:
    """The summary in a few lines for a person (the JSON has everything)."""
    r, acc, d, c, f = (summary[k] for k in ("requests", "served_accuracy", "drift", "checkpoints", "freshness_s"))
    ex = summary["examples"]
    detected = (f"detected {d['detected_after_s']} s later by {d['detector']}" if d["detected_after_s"] is not None
                else "not detected")
    return "\n".join([
        f"requests   {r['answered']:,} answered of {r['sent']:,}, failed: {r['failed'] or 'none'}",
        f"examples   {ex['labeled']:,} labeled, {ex['unlabeled']:,} unlabeled, {ex['late']:,} late"
        f" (all accounted for: {'yes' if summary['complete'] else 'NO'})",
        f"served acc before the drift {acc['before_drift']}, worst after {acc['worst_after_drift']},"
        f" final {acc['final']}; back to 95% after {acc['recovered_to_95pct_after_requests']} requests",
        f"drift      at {d['at_s']} s (request {d['at_request']:,}), {detected}",
        f"models     {c['published']} checkpoints published, {c['swaps_at_node']} swapped in by the node",
        f"freshness  label sent -> node serves a model trained on it: p50 {f['p50']} s, p99 {f['p99']} s",
        f"report     {summary['report']}",
    ])


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _report_html(config: DemoConfig, served: list[Served | None], seen: Observed, model_info: dict[str, Any],
                 t0: float, drift_wall: float | None, summary: dict[str, Any]) -> str:
    """A self-contained HTML page: the summary and an SVG plot of served accuracy over time."""
    points = [s for s in served if s is not None]
    points.sort(key=lambda s: s.sent_at)
    acc = _rolling([s.correct for s in points], 300)
    w, h, left, bottom, top = 960, 420, 50, 40, 20
    t_max = max((s.sent_at for s in points), default=1.0) or 1.0

    def x(t: float) -> float:
        return left + (w - left - 10) * t / t_max

    def y(a: float) -> float:
        return top + (h - top - bottom) * (1 - a)

    step = max(1, len(points) // 800)
    line = " ".join(f"{x(s.sent_at):.1f},{y(a):.1f}" for s, a in list(zip(points, acc, strict=True))[::step])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11">',
             f'<rect x="{left}" y="{top}" width="{w - left - 10}" height="{h - top - bottom}" fill="#fafafa" '
             f'stroke="#ccc"/>']
    for a in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        parts.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{a:.1f}</text>')
    for t in range(0, int(t_max) + 1, 10):
        parts.append(f'<text x="{x(t):.1f}" y="{h - bottom + 14}" text-anchor="middle">{t}s</text>')
    # Model versions: a tick where the served version changed.
    last = None
    for s in points:
        if s.version != last:
            parts.append(f'<line x1="{x(s.sent_at):.1f}" x2="{x(s.sent_at):.1f}" y1="{h - bottom}" '
                         f'y2="{h - bottom - 8}" stroke="#4a7"><title>v{s.version}</title></line>')
            last = s.version
    marks = []
    if drift_wall is not None:
        marks.append((drift_wall - t0, "#c33", "drift"))
    if summary["drift"]["detected_at_s"] is not None:
        marks.append((summary["drift"]["detected_at_s"], "#e90", "detected"))
    for t, color, label in marks:
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{h - bottom}" stroke="{color}" '
                     f'stroke-dasharray="5,3"/><text x="{x(t) + 4:.1f}" y="{top + 12}" fill="{color}">{label}</text>')
    parts.append(f'<polyline fill="none" stroke="#247" stroke-width="1.5" points="{line}"/>')
    parts.append(f'<text x="{left}" y="{h - 6}">served accuracy (last 300 requests) over time; green ticks: '
                 f'model version swaps at the serving node</text></svg>')
    svg = "\n".join(parts)
    (config.out / "served_accuracy.svg").write_text(svg)
    return ("<!doctype html><meta charset='utf-8'><title>stream-learner demo</title>"
            "<h1>stream-learner demo</h1>" + svg +
            "<h2>Summary</h2><pre>" + json.dumps(summary, indent=2) + "</pre>")
