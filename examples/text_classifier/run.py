"""Run the example end to end: local servers, the real ``stream-learner`` processes, a drifting review stream.

1. Pretrains the base (``pretrain.py``) into ``--build`` if it holds no ``base.safetensors`` yet.
2. Starts Tansu and Valkey on free ports (:class:`stream_learner.local.LocalServers`, what
   ``stream-learner demo`` uses), makes a signing key pair, and starts three processes with
   ``--config stream-learner.toml``: ``stream-learner joiner``, ``stream-learner trainer`` (LoRA on
   the frozen base, pseudo-labels on) and ``stream-learner serve --cold-start`` (the node, given
   the same base; it answers with the untrained head until the first delta arrives).
3. The application: ``--requests`` reviews (:mod:`corpus`) at ``--rate`` per second, POSTed to the
   node's ``/predict``; the node logs each prediction itself. A fraction ``--labeled`` of them gets
   its true label through the SDK 0.2-1.0 s later, ``--late`` 3.5-5 s later (after the joiner's 2 s
   window), the others never. The joiner emits a request without a label in its window as an
   unlabeled example, which the trainer pseudo-labels if it is confident; a late label then
   teaches the truth and tells whether the pseudo-label was right (its precision).
   Halfway (``--drift-at``) the slang words flip from complaint to praise.
4. Waits until every request and label is joined, trained on and served, then prints served
   accuracy (what the application got, scored against the truth) over the last window before the
   drift, the first window after it and the last window, label -> served freshness (the time from
   sending a label to the node serving a version whose manifest says it trained on that example),
   and the trainer's counts (labeled, pseudo-labeled, skipped) with the pseudo-labels' precision.

Run (from a checkout, with the ``dev`` and ``text`` extras installed)::

    python examples/text_classifier/run.py            # about 2 minutes on 2 cores
    python examples/text_classifier/run.py --requests 1200 --rate 40

Prints a summary and writes it as JSON to ``--out`` (default ``build/summary.json``).
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from kafka import TopicPartition

from stream_learner.bus import make_consumer
from stream_learner.checkpoint.publish import H_TYPE, TYPE_MANIFEST
from stream_learner.checkpoint.signing import generate_keypair
from stream_learner.config import Settings, load_settings, settings_env
from stream_learner.events import EXAMPLE, MANIFEST
from stream_learner.local import LocalServers, free_port
from stream_learner.sdk import PredictionLogger

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from corpus import stream  # noqa: E402
from pretrain import pretrain  # noqa: E402

CONFIG = HERE / "stream-learner.toml"
PROBE = "reviews-probe"  # the warm-up request's model: the trainer skips it as another model's


class Watch(threading.Thread):
    """Reads the examples and model topics from the beginning: where each label's example is, the manifests."""

    def __init__(self, settings: Settings, model: str) -> None:
        super().__init__(name="example-watch", daemon=True)
        self.settings, self.model = settings, model
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.kinds: Counter[str] = Counter()
        self.example_at: dict[str, tuple[int, int]] = {}  # label event id -> (partition, offset)
        self.examples_end: dict[int, int] = {}  # partition -> one past the last example read
        self.manifests: dict[int, Any] = {}
        self.ids: set[str] = set()
        self.probed = False

    def run(self) -> None:
        s = self.settings
        consumer = make_consumer(s, None)
        tps = [
            TopicPartition(t, p)
            for t in (s.topic_examples, s.topic_models)
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
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
        if topic == self.settings.topic_examples:
            ex = EXAMPLE.decode(record.value)
            self.examples_end[record.partition] = record.offset + 1
            if ex.model == PROBE:
                self.probed = True
            elif ex.example_id not in self.ids:  # at-least-once: a re-emitted example counts once
                self.ids.add(ex.example_id)
                self.kinds[ex.kind] += 1
                if ex.label_event_id is not None:
                    self.example_at[ex.label_event_id] = (record.partition, record.offset)
        elif dict(record.headers or ()).get(H_TYPE) == TYPE_MANIFEST:
            m = MANIFEST.decode(record.value)
            if m.model == self.model and m.variant is None:
                self.manifests[m.version] = m


class Labels(threading.Thread):
    """Sends each scheduled label when it is due, through the SDK, as an application would."""

    def __init__(self, sdk: PredictionLogger, model: str) -> None:
        super().__init__(name="example-labels", daemon=True)
        self.sdk, self.model = sdk, model
        self.heap: list[tuple[float, str, str]] = []
        self.cond = threading.Condition()
        self.sent_at: dict[str, float] = {}  # label event id -> when it was sent
        self.done = False

    def schedule(self, due: float, request_id: str, label: str) -> None:
        """Send ``label`` for ``request_id`` at wall-clock time ``due``."""
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
                if (wait := due - time.time()) > 0:
                    self.cond.wait(wait)
                    continue
                heapq.heappop(self.heap)
            event_id = self.sdk.log_label(request_id, label, model=self.model)
            if event_id is not None:
                self.sent_at[event_id] = time.time()


def _get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _alive(procs: dict[str, subprocess.Popen[bytes]], logs: Path) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            tail = (logs / f"{name}.log").read_text()[-3000:]
            raise RuntimeError(f"stream-learner {name} exited with {proc.returncode}:\n{tail}")


def _wait(what: str, done: Any, procs: dict[str, subprocess.Popen[bytes]], logs: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        _alive(procs, logs)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout_s:.0f} s: see the logs in {logs}")
        time.sleep(0.2)


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))], 3)


def run(
    *,
    requests: int = 4000,
    rate: float = 40.0,
    drift_at: float = 0.5,
    labeled: float = 0.5,
    late: float = 0.1,
    window: int = 400,
    seed: int = 1,
    build: Path = HERE / "build",
    quiet: bool = False,
    pretrain_sentences: int = 4000,
    pretrain_epochs: int = 2,
) -> dict[str, Any]:
    """Run the example (see the module docstring); return its summary."""

    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    t_start = time.monotonic()
    build = build.resolve()
    if not (build / "base.safetensors").exists() or not (build / "tokenizer.json").exists():
        pretrain(build, sentences=pretrain_sentences, epochs=pretrain_epochs, quiet=quiet)
    config = load_settings(config_file=CONFIG)  # checked here first: a bad setting fails before anything starts
    model = config.trainer_model
    assert model is not None
    rows = stream(requests, int(requests * drift_at), seed)
    drift = int(requests * drift_at)
    work = Path(tempfile.mkdtemp(prefix="text-classifier-"))
    logs = build / "logs"
    logs.mkdir(exist_ok=True)
    try:
        with LocalServers(workdir=work / "servers") as servers:
            private_pem, public_pem = generate_keypair()
            (work / "signing.pem").write_bytes(private_pem)
            (work / "signing.pub.pem").write_bytes(public_pem)
            port = free_port()
            # Only where things are goes through the environment; what the example is, is the TOML file.
            where = msgspec.structs.replace(
                servers.settings,
                trainer_signing_key=str(work / "signing.pem"),
                trainer_state_dir=str(work / "trainer-state"),
                serving_state_dir=str(work / "serving-state"),
                serving_public_keys=[str(work / "signing.pub.pem")],
                serving_port=port,
            )
            env = settings_env(where)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
            procs: dict[str, subprocess.Popen[bytes]] = {}
            try:
                for name, args in (
                    ("joiner", ["joiner"]),
                    ("trainer", ["trainer"]),
                    ("serve", ["serve", "--cold-start"]),
                ):
                    with (logs / f"{name}.log").open("wb") as log:
                        procs[name] = subprocess.Popen(
                            [sys.executable, "-m", "stream_learner.cli", *args, "--config", str(CONFIG)],
                            env=env,
                            cwd=build,  # the TOML's relative paths (tokenizer.json, base.safetensors)
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                settings = load_settings(env=env, config_file=CONFIG)
                return _play(
                    settings, model, rows, drift, rate, port, procs, logs, (labeled, late), window, seed, say, t_start
                )
            finally:
                for proc in procs.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                for proc in procs.values():
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the private signing key goes with it


def _play(
    settings: Settings,
    model: str,
    rows: list[tuple[str, str]],
    drift: int,
    rate: float,
    port: int,
    procs: dict[str, subprocess.Popen[bytes]],
    logs: Path,
    fates: tuple[float, float],
    window: int,
    seed: int,
    say: Any,
    t_start: float,
) -> dict[str, Any]:
    labeled, late = fates

    def healthy() -> bool:
        try:
            return _get(port, "/health")[0] == 200
        except OSError:
            return False

    _wait("the serving node did not answer", healthy, procs, logs, 120)
    watch = Watch(settings, model)
    watch.start()
    sdk = PredictionLogger(settings=settings, model=model)
    labels = Labels(sdk, model)
    try:
        # A consumer group's first join takes seconds on Tansu: wait until a probe comes out joined,
        # so the traffic is not served by the untrained model for that long.
        sdk.log_prediction("probe", {}, {"neg": 0.5, "pos": 0.5}, model=PROBE, model_version="0")
        sdk.log_label("probe", "neg", model=PROBE)
        _wait("the joiner joined no probe", lambda: watch.probed, procs, logs, 120)
        say(f"processes up in {time.monotonic() - t_start:.0f} s; {len(rows)} requests, the drift at request {drift}")
        rng = random.Random(seed)
        labels.start()
        served: list[tuple[float, int, bool]] = []  # (answered at, model version, correct)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        t0 = time.time()
        for i, (text, truth) in enumerate(rows):
            if (wait := t0 + i / rate - time.time()) > 0:
                time.sleep(wait)
            body = json.dumps({"request_id": f"r{i}", "features": {"review": text}})
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"request {i}: HTTP {resp.status} {answer}")
            probs = answer["prediction"]
            served.append((time.time(), int(answer["model_version"]), max(probs, key=probs.get) == truth))
            fate = rng.random()
            if fate < labeled:
                labels.schedule(time.time() + rng.uniform(0.2, 1.0), f"r{i}", truth)
            elif fate < labeled + late:  # after the join window: pseudo-labeled first, then the truth
                labels.schedule(time.time() + rng.uniform(3.5, 5.0), f"r{i}", truth)
            if (i + 1) % max(1, len(rows) // 8) == 0:
                recent = served[-window:]
                say(
                    f"  request {i + 1:>5}: served accuracy (last {len(recent)}) "
                    f"{sum(c for _, _, c in recent) / len(recent):.3f}, model v{served[-1][1]}"
                    + ("  (after the drift)" if i >= drift else "")
                )
        conn.close()
        labels.finish()
        sdk.flush(30)

        def caught_up() -> bool:
            with watch.lock:
                newest = max(watch.manifests.values(), key=lambda m: m.version, default=None)
                kinds = watch.kinds
                # One labeled-or-unlabeled example per request, one labeled-or-late per label sent.
                if newest is None or kinds["labeled"] + kinds["unlabeled"] < len(rows):
                    return False
                if kinds["labeled"] + kinds["late"] < len(labels.sent_at):
                    return False
                applied = {s.partition: s.offset for s in newest.input_offsets}
                if any(applied.get(p, 0) < end for p, end in watch.examples_end.items()):
                    return False
            try:
                return bool(_get(port, "/health")[1].get("version") == newest.version)
            except OSError:
                return False

        _wait("the tail was not joined, trained on and served", caught_up, procs, logs, 60)
    finally:
        watch.stop.set()
        sdk.close()
    watch.join()
    _, info = _get(port, "/model")
    return _summary(watch, labels.sent_at, served, info, drift, window, t0, say, t_start)


def _summary(
    watch: Watch,
    label_sent_at: dict[str, float],
    served: list[tuple[float, int, bool]],
    info: dict[str, Any],
    drift: int,
    window: int,
    t0: float,
    say: Any,
    t_start: float,
) -> dict[str, Any]:
    def acc(part: list[tuple[float, int, bool]]) -> float:
        return round(sum(c for _, _, c in part) / len(part), 4) if part else float("nan")

    before, after = served[:drift], served[drift:]
    # Freshness: label sent -> the node serves a version whose manifest says it trained on the label's example.
    swaps = sorted((s["at"], s["version"]) for s in info.get("swaps", []))
    covers = sorted(watch.manifests.items())
    fresh = []
    for event_id, sent in label_sent_at.items():
        if (where := watch.example_at.get(event_id)) is None:
            continue
        p, o = where
        version = next((v for v, m in covers if any(s.partition == p and s.offset > o for s in m.input_offsets)), None)
        at = next((t for t, v in swaps if version is not None and v >= version and t >= sent), None)
        if at is not None:
            fresh.append(at - sent)
    newest = covers[-1][1]
    sizes = sorted(m.weights.size for _, m in covers)
    # The trainer's counts: labels learned, unlabeled examples learned as pseudo-labels, late labels learned
    # (after a pseudo-label, whose precision they measure), and skipped (unconfident, and the probe).
    counts = {k: newest.counts.get(k, 0) for k in ("labeled", "pseudo", "late", "skipped")}
    summary = {
        "requests": len(served),
        "drift_at_request": drift,
        "window": window,
        "served_accuracy": {
            "before_drift": acc(before[-window:]),
            "first_after_drift": acc(after[:window]),
            "last": acc(after[-window:]),
            "all_after_drift": acc(after),
        },
        "freshness_s": {"labels": len(fresh), "p50": quantile(fresh, 0.5), "p99": quantile(fresh, 0.99)},
        "checkpoints": {
            "published": len(covers),
            "swapped_in": len({v for _, v in swaps}),
            "delta_bytes_p50": sizes[len(sizes) // 2],
            "newest": newest.version,
        },
        "examples": dict(watch.kinds),
        "trainer_counts": counts,
        "pseudo_precision": newest.metrics.get("pseudo_precision"),
        "traffic_s": round(served[-1][0] - t0, 1),
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    a, f, c = summary["served_accuracy"], summary["freshness_s"], summary["checkpoints"]
    say(
        f"served accuracy: before the drift {a['before_drift']}, first {window} after it {a['first_after_drift']}, "
        f"last {window} {a['last']}"
    )
    say(
        f"freshness: label sent -> node serves a model trained on it: p50 {f['p50']} s, p99 {f['p99']} s "
        f"({f['labels']} labels)"
    )
    say(
        f"checkpoints: {c['published']} published (LoRA deltas, p50 {c['delta_bytes_p50']:,} bytes), "
        f"{c['swapped_in']} swapped in by the node"
    )
    say(f"examples joined: {dict(watch.kinds)}")
    say(f"trainer learned: {counts}; pseudo-label precision {summary['pseudo_precision']}")
    say(f"traffic {summary['traffic_s']} s, wall {summary['wall_s']} s")
    return summary


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--labeled", type=float, default=0.5, help="the fraction of requests that get a label")
    parser.add_argument("--late", type=float, default=0.1, help="the fraction labeled after the join window")
    parser.add_argument("--drift-at", type=float, default=0.5, help="the fraction of requests before the drift")
    parser.add_argument("--window", type=int, default=400, help="requests per accuracy window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--build", type=Path, default=HERE / "build", help="the pretrained base and the logs")
    parser.add_argument("--out", type=Path, default=None, help="the summary's JSON (default: BUILD/summary.json)")
    args = parser.parse_args(argv)
    summary = run(
        requests=args.requests,
        rate=args.rate,
        drift_at=args.drift_at,
        labeled=args.labeled,
        late=args.late,
        window=args.window,
        seed=args.seed,
        build=args.build,
    )
    out = args.out or args.build / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
