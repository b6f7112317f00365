"""Pipeline benchmark: the real CLI processes at their defaults against raw consume (R) and a naive loop.

One input (bench_joiner's ``event_stream``: ``--predictions`` predictions
with 16 features, ~90 % labeled within 500 ms of event time, on 4
partitions per input topic, then one far-future prediction + label per
partition so the watermark closes every window), and in every repeat, in a
rotated order:

* ``raw``        -- kafka-python, one group-less consumer on every input
                    partition, values not decoded: **R**, the ratios' base;
* ``librdkafka`` -- the same with confluent-kafka's ``Consumer.consume``
                    (the librdkafka ceiling), when the package is installed;
* ``joiner``     -- ``python -m stream_learner joiner``, its own group,
                    prefix and examples topic. Rate: input events over the
                    time between the first and the last sample of its
                    group's committed offsets (sampled every 0.25 s) that
                    moved, so start-up and the group join are left out;
* ``trainer``    -- ``python -m stream_learner trainer`` over that repeat's
                    examples topic (the joiner's output). Rate: examples
                    between its first and its last count-triggered
                    checkpoint (every ``trainer_checkpoint_every_examples``,
                    10 000 by default) over the time between their records;
* ``run``        -- ``python -m stream_learner run`` (joiner and trainer in
                    one process) on fresh topics: examples/s as for the
                    trainer, turned into input events/s by the input's
                    events per example (the trainer half is the pipeline's
                    end, and it cannot run ahead of its joiner half);
* ``run-threads`` -- ``run`` with ``run_joiner_process = false``: both roles
                    threads of one process (one interpreter lock);
* ``naive``      -- the loop one writes first: one consumer, one Redis
                    round trip per event (SET the prediction, GET it for a
                    label), one SGD step of a torch logistic regression per
                    labeled example, over the first ``--naive-events``.

Every role runs at its defaults apart from what it must be told: servers,
topics, group ids, prefixes, the model's name, features and classes, and a
signing key. With ``--transports kafka-python,confluent`` the roles run
again with ``kafka_client = "confluent"`` (when the setting exists); with
``--examples-format json,batch`` again with ``examples_format = "batch"``
(cases ``joiner/kafka-python/batch``, ...). The trainer's examples are
counted from its manifests' learner counts (a batch record holds many). The
RSS of each role process and its children is sampled from ``/proc`` every
0.25 s: the peak, and the growth (the last tenth of the run against the
second tenth; ``--predictions 526000`` is about a million input events).

What it can show on the 2-core machine: ratios to R of the same repeat (a
role process, Tansu and Valkey share two cores; R's consumer has one core
to itself and Tansu the other). Not shown: a real Kafka cluster, network.

Run::

    .venv/bin/python bench/bench_pipeline.py [--predictions 100000] [--repeats 3] [--transports kafka-python]
        [--examples-format json,batch]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import redis
from kafka import KafkaAdminClient, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_foundation import machine_info
from bench_joiner import MODEL, N_FEATURES, T0, advance_watermark, event_stream, phase_raw_consume, produce_stream

from stream_learner.bus import ensure_topics, kafka_options, make_consumer, make_producer
from stream_learner.checkpoint.signing import generate_keypair
from stream_learner.config import Settings, settings_env
from stream_learner.events import LABEL, MANIFEST, PREDICTION
from stream_learner.local import LocalServers

PARTITIONS = 4
RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.json"
TIMEOUT_S = 900.0
FEATURES = [f"f{j}" for j in range(N_FEATURES)]


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and its descendants (``run`` hosts its joiner in a child)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    return total


class Role:
    """A CLI role as a subprocess, its RSS (with its children) sampled over time, stopped with SIGTERM."""

    #: With a directory, py-spy samples each role (250 Hz) into ``<dir>/<log name>.txt`` (``--profile``).
    profile_dir: Path | None = None

    def __init__(self, verb: str, settings: Settings, log: Path) -> None:
        self.log = log
        self.rss: list[int] = []  # every 0.25 s
        self._out = log.open("w")
        env = {**settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_learner", verb], env=env, stdout=self._out, stderr=self._out
        )
        self.spy: subprocess.Popen[bytes] | None = None
        if self.profile_dir is not None:
            self.profile = self.profile_dir / f"{log.stem}.txt"
            spy = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(self.proc.pid)]
            opts = ["--rate", "250", "--format", "raw", "--threads", "--subprocesses", "--nonblocking"]
            opts += ["-o", str(self.profile)]
            self.spy = subprocess.Popen([*spy, *opts], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.wait(0.25) and self.proc.poll() is None:
            self.rss.append(tree_rss(self.proc.pid))

    @property
    def peak_rss(self) -> int:
        """The largest RSS sampled."""
        return max(self.rss, default=0)

    def rss_growth(self) -> float | None:
        """RSS over the last tenth of the run against the second tenth (after start-up): 1.0 is flat."""
        n = len(self.rss)
        if n < 20:
            return None
        first = sorted(self.rss[n // 10 : n // 5])[n // 20]
        last = sorted(self.rss[-(n // 10) :])[n // 20]
        return last / first

    def memory(self) -> dict[str, Any]:
        """Peak RSS in MiB and its growth over the run."""
        return {"peak_rss_mib": self.peak_rss / 2**20, "rss_growth": self.rss_growth()}

    def check(self) -> None:
        """Raise if the process ended on its own."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.log.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 30 s."""
        self._done.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        if self.spy is not None:
            self.spy.wait(60)  # writes its file once the role has exited
            print(f"{self.log.stem}: where the time goes (py-spy samples)\n{profile_table(self.profile)}", flush=True)


#: Where a sample's innermost frame is, by path: the package it is spent in.
PACKAGES = (
    ("/kafka/", "kafka-python"),
    ("/confluent_kafka/", "confluent-kafka"),
    ("/redis/", "redis-py"),
    ("/torch/", "torch"),
    ("/river/", "river"),
    ("/msgspec/", "msgspec"),
    ("/structlog/", "structlog"),
    ("/prometheus_client/", "prometheus"),
)


def where(frame: str) -> str:
    """The package (or stream_learner module) of one py-spy raw frame, ``name (path:line)``."""
    path = frame.rsplit(" (", 1)[-1]
    if "/stream_learner/" in path:
        module = path.split("/stream_learner/", 1)[1].split(":", 1)[0].removesuffix(".py")
        return "stream_learner." + module.replace("/", ".")
    for marker, name in PACKAGES:
        if marker in path:
            return name
    return "python (stdlib, C calls)" if path else "idle or native"


def profile_table(path: Path, top: int = 14) -> str:
    """Samples per place (the innermost frame's package; C work counts where Python called it), by thread."""
    by_thread: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")  # process N:"cmd";thread (id): name;frame;...
        proc = frames[0].split(":", 1)[0] if frames[0].startswith("process ") else ""
        thread = next((f.split("): ", 1)[-1] for f in frames if f.startswith("thread (")), "?")
        thread = f"{proc} {thread}".strip()
        calls = [f for f in frames if not f.startswith(("process ", "thread ("))]
        inner = calls[-1] if calls else ""
        places = by_thread.setdefault(thread, {})
        places[where(inner)] = places.get(where(inner), 0) + int(count)
    lines = []
    for thread, places in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(places.values())
        lines.append(f"  {thread}: {total} samples")
        for place, n in sorted(places.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * n / total:5.1f} %  {place}")
    return "\n".join(lines) or "  (no samples)"


#: The manifest counts that together count every example a checkpoint covers (skipped: duplicates, other
#: models, refused labels, unlabeled examples not learned).
_EXAMPLE_COUNTS = ("labeled", "late", "pseudo", "skipped")


def manifests(settings: Settings) -> list[tuple[int, int]]:
    """(record timestamp ms, examples learned) of every manifest on the models topic so far.

    Examples, from the manifest's counts: its input offsets count records, and a batch record
    (examples_format = "batch") holds many examples.
    """
    consumer = make_consumer(settings, group_id=None)
    tp = TopicPartition(settings.topic_models, 0)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        out = []
        while consumer.position(tp) < end:
            for batch in consumer.poll(1000).values():
                for r in batch:
                    if dict(r.headers).get("sl-type") == b"manifest":
                        counts = MANIFEST.decode(r.value).counts
                        out.append((r.timestamp, sum(counts.get(k, 0) for k in _EXAMPLE_COUNTS)))
        return out
    finally:
        consumer.close()


def committed(admin: KafkaAdminClient, group: str) -> int:
    """The sum of a group's committed offsets (0 before its first commit)."""
    offsets = admin.list_group_offsets({group: None}).get(group) or {}
    return sum(o.offset for o in offsets.values() if o.offset > 0)


def examples_rate(marks: list[tuple[int, int]], examples: int) -> float:
    """Examples/s between the first checkpoint and the last one before the input ran out (the one that
    holds every example may be a clock checkpoint, after idle time)."""
    before = [m for m in marks if m[1] < examples]
    span = before if len(before) >= 2 else marks
    (t0, n0), (t1, n1) = span[0], span[-1]
    return (n1 - n0) / max((t1 - t0) / 1000, 1e-9)


def until(what: str, done: Any, role: Role, every_s: float) -> None:
    """Poll ``done`` every ``every_s`` until it is true; fail if the role exits or takes too long."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        role.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done in {TIMEOUT_S:.0f} s")
        time.sleep(every_s)


def case_joiner(s: Settings, total_in: int, tmp: Path) -> dict[str, Any]:
    admin = KafkaAdminClient(**kafka_options(s))
    role = Role("joiner", s, tmp / f"{s.joiner_group_id}.log")
    samples: list[tuple[float, int]] = []
    try:

        def all_in() -> bool:
            samples.append((time.monotonic(), committed(admin, s.joiner_group_id)))
            return samples[-1][1] >= total_in

        until("joiner", all_in, role, 0.25)
    finally:
        role.stop()
        admin.close()
    moved = [(t, n) for t, n in samples if n > 0]
    (t0, n0), (t1, n1) = moved[0], moved[-1]
    return {"events_per_s": (n1 - n0) / max(t1 - t0, 1e-9), **role.memory()}


def case_trainer(s: Settings, examples: int, tmp: Path) -> dict[str, Any]:
    role = Role("trainer", s, tmp / f"{s.trainer_group_id}.log")
    try:
        until("trainer", lambda: (m := manifests(s)) and m[-1][1] >= examples, role, 1.0)
    finally:
        role.stop()
    rate = examples_rate(manifests(s), examples)
    return {"examples_per_s": rate, **role.memory()}


def case_run(s: Settings, examples: int, total_in: int, tmp: Path) -> dict[str, Any]:
    role = Role("run", s, tmp / f"{s.joiner_group_id}.run.log")
    try:
        until("run", lambda: (m := manifests(s)) and m[-1][1] >= examples, role, 1.0)
    finally:
        role.stop()
    rate = examples_rate(manifests(s), examples)
    return {"events_per_s": rate * total_in / examples, "examples_per_s": rate, **role.memory()}


def case_librdkafka(s: Settings, total_in: int) -> dict[str, Any] | None:
    try:
        from confluent_kafka import Consumer
        from confluent_kafka import TopicPartition as CTP
    except ImportError:
        return None
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": "bench-raw", "enable.auto.commit": False})
    c.assign([CTP(t, p, 0) for t in (s.topic_predictions, s.topic_labels) for p in range(PARTITIONS)])
    seen, first, t0 = 0, 0, None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while seen < total_in and time.monotonic() < deadline:
            got = len([m for m in c.consume(10_000, 0.1) if m.error() is None])
            seen += got
            if got and t0 is None:
                t0, first = time.perf_counter(), got
        t1 = time.perf_counter()
    finally:
        c.close()
    if t0 is None or seen < total_in:
        raise RuntimeError(f"librdkafka consume read {seen}/{total_in}")
    return {"events_per_s": (seen - first) / (t1 - t0)}


def case_naive(s: Settings, n: int) -> dict[str, Any]:
    """One Redis round trip per event, batch-1 SGD per labeled example."""
    import torch

    consumer = make_consumer(s, None)
    r = redis.Redis.from_url(s.redis_url)
    model = torch.nn.Linear(N_FEATURES, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tps = [TopicPartition(t, p) for t in (s.topic_predictions, s.topic_labels) for p in range(PARTITIONS)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen = 0
    t0 = time.perf_counter()
    try:
        while seen < n:
            for batch in consumer.poll(100).values():
                for rec in batch:
                    seen += 1
                    if rec.topic == s.topic_predictions:
                        p = PREDICTION.decode(rec.value)
                        r.set(f"naive:{p.request_id}", json.dumps([p.features.get(f) or 0.0 for f in FEATURES]))
                    else:
                        lab = LABEL.decode(rec.value)
                        x = r.get(f"naive:{lab.request_id}")
                        if x is not None:
                            xs = torch.tensor(json.loads(x), dtype=torch.float32)
                            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                                model(xs), torch.tensor([float(lab.label == "yes")])
                            )
                            opt.zero_grad()
                            loss.backward()
                            opt.step()
    finally:
        consumer.close()
    return {"events_per_s": seen / (time.perf_counter() - t0)}


def one_repeat(
    base: Settings,
    r: int,
    total_in: int,
    examples: int,
    transports: list[str],
    naive_n: int,
    tmp: Path,
    run_only: bool = False,
    formats: tuple[str, ...] = ("json",),
) -> dict[str, Any]:
    """Every case once (``run_only``: R and the two ways of hosting ``run``); returns name -> result.

    Each role case runs once per transport and examples format (``joiner/kafka-python`` for json,
    ``joiner/kafka-python/batch`` for batch).
    """
    out: dict[str, Any] = {"raw": phase_raw_consume(base, total_in, 5000, PARTITIONS)}
    if (lib := case_librdkafka(base, total_in)) is not None:
        out["librdkafka"] = lib
    if not run_only:
        out["naive"] = case_naive(base, naive_n)
    for transport, fmt in [(t, f) for t in transports for f in formats]:
        extra: dict[str, Any] = {} if transport == "kafka-python" else {"kafka_client": transport}
        if fmt != "json":
            extra["examples_format"] = fmt
        tag = f"{transport}.{r}" if fmt == "json" else f"{transport}.{fmt}.{r}"
        transport = transport if fmt == "json" else f"{transport}/{fmt}"  # the cases' names
        j = msgspec.structs.replace(
            base,
            joiner_group_id=f"bench-joiner-{tag}",
            joiner_redis_prefix=f"{{bench-{tag}}}:",
            topic_examples=f"bench.examples.{tag}",
            topic_dlq=f"bench.dlq.{tag}",
            **extra,
        )
        ensure_topics(j)
        if not run_only:
            out[f"joiner/{transport}"] = case_joiner(j, total_in, tmp)
        t = msgspec.structs.replace(
            j,
            topic_models=f"bench.models.{tag}",
            topic_drift=f"bench.drift.{tag}",
            trainer_group_id=f"bench-trainer-{tag}",
            trainer_state_dir=str(tmp / f"trainer.{tag}"),
        )
        ensure_topics(t)
        if not run_only:
            out[f"trainer/{transport}"] = case_trainer(t, examples, tmp)
        u = msgspec.structs.replace(
            t,
            joiner_group_id=f"bench-run-{tag}",
            joiner_redis_prefix=f"{{bench-run-{tag}}}:",
            topic_examples=f"bench.examples.run.{tag}",
            topic_models=f"bench.models.run.{tag}",
            trainer_group_id=f"bench-run-trainer-{tag}",
            trainer_state_dir=str(tmp / f"run.{tag}"),
        )
        ensure_topics(u)
        # The other way to host run's roles: the joiner a thread of the trainer's process (one GIL).
        v = msgspec.structs.replace(
            u,
            run_joiner_process=False,
            joiner_group_id=f"bench-run1-{tag}",
            joiner_redis_prefix=f"{{bench-run1-{tag}}}:",
            topic_examples=f"bench.examples.run1.{tag}",
            topic_models=f"bench.models.run1.{tag}",
            trainer_group_id=f"bench-run1-trainer-{tag}",
            trainer_state_dir=str(tmp / f"run1.{tag}"),
        )
        ensure_topics(v)
        # Paired, the order swapped every repeat.
        for name, cs in (("run", u), ("run-threads", v))[:: 1 if r % 2 == 0 else -1]:
            out[f"{name}/{transport}"] = case_run(cs, examples, total_in, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    """Produce the input, run the repeats, print min/median/max and ratios to R, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--predictions", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-events", type=int, default=20_000)
    ap.add_argument("--transports", default="kafka-python", help="comma-separated: kafka-python, confluent")
    ap.add_argument("--run-only", action="store_true", help="only R and the two ways of hosting run")
    ap.add_argument("--examples-format", default="json", help="comma-separated examples_format values: json, batch")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--profile", type=Path, help="a directory: py-spy profiles of every role process, summarised")
    args = ap.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        Role.profile_dir = args.profile
    transports = args.transports.split(",")
    formats = tuple(args.examples_format.split(","))
    if "confluent" in transports and "kafka_client" not in Settings.__struct_fields__:
        raise SystemExit("this tree has no kafka_client setting: --transports kafka-python")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmpdir:
        tmp = Path(tmpdir)
        base_settings = Settings(partitions_input=PARTITIONS, partitions_examples=PARTITIONS)
        with LocalServers(base_settings, tmp / "servers") as servers:
            key = tmp / "signing.pem"
            key.write_bytes(generate_keypair()[0])
            key.chmod(0o600)
            base = msgspec.structs.replace(
                servers.settings,
                trainer_model=MODEL,
                trainer_features=FEATURES,
                trainer_classes=["yes", "no"],
                trainer_signing_key=str(key),
                log_format="json",
            )
            producer = make_producer(base)
            counts = produce_stream(producer, base, event_stream(args.predictions, seed=7, tag="pipe"))
            producer.close()
            far = T0 + args.predictions + 10**7
            sentinels = advance_watermark(base, far, "pipe", PARTITIONS)
            total_in = counts["prediction"] + counts["label"] + 2 * sentinels
            # Every prediction gives one example (labeled or unlabeled) once its window closes.
            examples = counts["prediction"] + sentinels
            rounds = []
            for r in range(args.repeats):
                res = one_repeat(
                    base, r, total_in, examples, transports, args.naive_events, tmp, args.run_only, formats
                )
                rounds.append(res)
                print(json.dumps({"repeat": r, **res}), flush=True)
    summary: dict[str, Any] = {}
    for name in rounds[0]:
        rates = []
        ratios = []
        for res in rounds:
            rate = res[name].get("events_per_s", res[name].get("examples_per_s"))
            rates.append(rate)
            ratios.append(rate / res["raw"]["events_per_s"])
        summary[name] = {
            "rate": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
            "vs_R": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
            "peak_rss_mib": max((res[name].get("peak_rss_mib") or 0) for res in rounds) or None,
            "rss_growth": max((g for res in rounds if (g := res[name].get("rss_growth"))), default=None),
            "unit": "examples/s" if name.startswith("trainer") else "events/s",
        }
    if "naive" in summary:
        for name in summary:
            if name.startswith("run"):
                summary[name]["vs_naive"] = summary[name]["rate"]["median"] / summary["naive"]["rate"]["median"]
    print(f"\n{total_in:,} input events, {examples:,} examples, {PARTITIONS} partitions, {args.repeats} repeat(s)")
    print(f"{'case':<28} {'unit':<11} {'median':>9} {'min':>9} {'max':>9} {'vs R':>6} {'peak RSS':>9} {'growth':>6}")
    for name, row in summary.items():
        rss = f"{row['peak_rss_mib']:.0f} MiB" if row["peak_rss_mib"] else ""
        growth = f"{row['rss_growth']:.2f}" if row["rss_growth"] else ""
        print(
            f"{name:<28} {row['unit']:<11} {row['rate']['median']:>9,.0f} {row['rate']['min']:>9,.0f} "
            f"{row['rate']['max']:>9,.0f} {row['vs_R']['median']:>6.3f} {rss:>9} {growth:>6}"
        )
    for name, row in summary.items():
        if "vs_naive" in row:
            print(f"{name}: {row['vs_naive']:.1f}x the naive loop")
    result = {
        "benchmark": "pipeline",
        "input_events": total_in,
        "examples": examples,
        "partitions": PARTITIONS,
        "repeats": args.repeats,
        "summary": summary,
        "rounds": rounds,
        "wall_seconds": time.monotonic() - began,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
