"""Joiner scale-out benchmark: one or two joiner processes, on one Valkey node or a 3-master cluster.

Four cases over the same input, each with its own consumer group, Redis
prefix (a hash tag) and examples topic:

(a) 1 joiner process, one Valkey node              -- the reference of the ratios
(b) 1 joiner process, a 3-master Valkey cluster    (``redis_cluster``)
(c) 2 joiner processes in one group, the cluster   (one prefix: one slot)
(d) 2 joiner processes in one group, one node

plus a raw kafka-python consume of the same input records (one group-less
consumer on every input partition, values not decoded; bench_joiner's
baseline). Each joiner is the real :class:`stream_learner.join.joiner.Joiner`
in a process of its own (``multiprocessing`` spawn: processes, not threads).
The processes build their joiners, wait at a barrier and step at once, so
both join the group in one generation (Tansu makes a group join last the
rebalance timeout, 3 s here); the number of assignments each saw is
reported (more than one: a rebalance during the run).

The input (made once, by bench_joiner's ``event_stream``): ``--events``/2
predictions with 16 features and their labels (~10 % get none, delays
1-500 ms of event time inside the 5 s window), on 4 partitions per topic,
then one far-future prediction + label on every partition, so the
watermark closes every window by the end of the input. A case's clock
starts when the first of its processes returns from a step that read
records (the group join and that first batch are left out), and stops when
every input event is consumed and every example is emitted and produced:
the last moment any process did work (consumed, or produced examples)
before the totals, shared between the processes, were complete. Rate:
input events after the first batch / that time. On Tansu one of two
processes sometimes gets its partitions about 1 s after the other (a
group-join artifact, not steady state), so the table also gives the rate
from the moment the *last* process read its first records ("all
started": the events consumed after that moment, from each process's
per-step trace, over the time left). The examples topic is read back
after each case: exactly the expected distinct example ids (labeled,
unlabeled and the sentinels' labeled, no late ones); duplicates (same id
twice, which the joiner allows) are reported. Valkey is flushed between
cases. Cases run in a rotated order in each repeat; ratios pair
numbers of the same repeat, and the medians over repeats are reported.

What the numbers can show on the 2-core development machine, and what not:

* The joiner's cost on a cluster (b vs a): the slot router and the same
  ``EVALSHA`` + ``WAITAOF`` on the one primary that owns the prefix's slot.
  A cluster spreads *different* prefixes (groups, roles) over primaries; one
  joiner group's state is one slot, so its Redis work never runs on more
  than one primary, however many there are (the join is one atomic script
  over all of its keys).
* Whether a second joiner process adds throughput *here* (c, d vs a). It
  can only add what the first one left idle of the two cores: two joiner
  processes, Tansu and the Valkey primary share them (and whatever else
  runs on the machine). CPU microseconds per event × events/s is the
  cores a process keeps busy: in the stored run one joiner, Valkey and
  Tansu used about 1.3 of the 2 cores, two joiners with them about 1.7.
  So a ratio here says little about a deployment with a core (or a host)
  per process, where it may be higher, and nothing about more than two.
* A ceiling that holds everywhere: one group's join runs on one primary's
  one thread, so Valkey's CPU per event (~15 us here; all of its threads
  are counted, the AOF's too, so this is approximate) bounds one group at
  about 1e6 / that many events/s however many joiners it has. Past it, more throughput takes more groups (disjoint
  input topics, each its own prefix and slot), which a cluster spreads
  over primaries.
* Not shown: scaling beyond 2 processes, network latency between hosts
  (all of it is loopback), a real Kafka cluster (Tansu is one in-memory
  broker), or Valkey primaries on their own cores.

Run::

    .venv/bin/python bench/scale_joiner.py [--events N] [--repeats R] [--out FILE]

Results go to ``bench/results/scale_joiner.json`` by default.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis
from kafka import TopicPartition

from stream_learner.bus import make_producer
from stream_learner.config import Settings
from stream_learner.join.joiner import Joiner
from stream_learner.local import LocalServers, LocalValkeyCluster
from stream_learner.logging import configure_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_joiner
from bench_foundation import machine_info
from bench_joiner import (
    SEED,
    STEP_TIMEOUT_S,
    T0,
    WINDOW_MS,
    advance_watermark,
    consumed,
    cpu_per_record,
    cpu_seconds,
    create_topics,
    event_stream,
    joiner_settings,
    phase_raw_consume,
    produce_stream,
    read_examples,
)

RESULTS = Path(__file__).resolve().parent / "results" / "scale_joiner.json"
PARTITIONS = 4
DEFAULT_EVENTS = 200_000
DEFAULT_REPEATS = 3
#: name: (joiner processes, on the cluster?)
CASES: dict[str, tuple[int, bool]] = {
    "a": (1, False),
    "b": (1, True),
    "c": (2, True),
    "d": (2, False),
}
LABELS = {
    "a": "(a) 1 joiner, 1 node",
    "b": "(b) 1 joiner, cluster",
    "c": "(c) 2 joiners, cluster",
    "d": "(d) 2 joiners, 1 node",
}


# -- one joiner process ---------------------------------------------------------


def _worker(
    index: int,
    settings: Settings,
    total_events: int,
    total_examples: int,
    shared: Any,
    barrier: Any,
    results: Any,
) -> None:
    """One joiner, stepped until the processes' shared totals say every event is in and every example out.

    ``shared`` holds (events consumed, examples emitted) per process; each
    writes its own after every step and reads the others'.
    """
    configure_logging("warning")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    joiner: Joiner | None = None
    try:
        joiner = Joiner(settings, poll_timeout_ms=100)
        barrier.wait(120)
        released = time.monotonic()
        t0: float | None = None
        first = 0
        cpu0: dict[str, float] = {}
        last_busy = released
        assignments: list[tuple[float, list[str]]] = []  # (seconds after the barrier, partitions)
        trace: list[tuple[float, int]] = []  # (time, events consumed) after each step
        current: frozenset[TopicPartition] = frozenset()
        deadline = released + STEP_TIMEOUT_S
        step = joiner.step
        while True:
            if time.monotonic() > deadline:
                raise SystemExit(f"joiner {index} timed out: counts={joiner.counts}, shared={list(shared)}")
            had_output = bool(joiner._output)  # this step produces the previous one's examples
            got = step()
            now = time.monotonic()
            shared[2 * index] = done = consumed(joiner)
            trace.append((now, done))
            shared[2 * index + 1] = sum(joiner.counts.examples.values())
            if got or had_output:
                last_busy = now
            if got and t0 is None:
                t0, first, cpu0 = now, got, cpu_seconds()
            assigned = frozenset(joiner.consumer.assignment())
            if assigned != current:
                current = assigned
                names = sorted(f"{tp.topic.rsplit('.', 1)[-1]}:{tp.partition}" for tp in assigned)
                assignments.append((now - released, names))
            if sum(shared[0::2]) >= total_events and sum(shared[1::2]) >= total_examples:
                if joiner._output:
                    joiner.flush()
                    last_busy = time.monotonic()
                break
        cpu1 = cpu_seconds()
        retries = joiner.metrics.registry.get_sample_value(
            "stream_learner_joiner_retries_total", {"dependency": "redis"}
        )
        out = {
            "released": released,
            "t0": t0,
            "first_batch": first,
            "end": last_busy,
            "consumed": consumed(joiner),
            "cpu_seconds": {k: cpu1[k] - cpu0.get(k, cpu1[k]) for k in cpu1},
            "assignments": assignments,
            "trace": trace,
            "redis_retries": retries or 0,
        }
        joiner.close()
        out["counts"] = json.loads(json.dumps(joiner.counts.__dict__))
        joiner = None
        results.put((index, "ok", out))
    except BaseException:
        results.put((index, "error", traceback.format_exc()))
    finally:
        if joiner is not None:
            joiner.close()


def run_case(
    name: str, settings: Settings, processes: int, total_events: int, expected: dict[str, int], server_pids: dict
) -> dict[str, Any]:
    """Run ``processes`` joiners in one group over the input; time, check and return the case."""
    total_examples = expected["labeled"] + expected["unlabeled"]
    ctx = mp.get_context("spawn")
    shared = ctx.RawArray("q", 2 * processes)
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    args = (settings, total_events, total_examples, shared, barrier, results)
    procs = [ctx.Process(target=_worker, args=(i, *args), daemon=True) for i in range(processes)]
    for p in procs:
        p.start()
    try:
        barrier.wait(120)
        bench_joiner.PIDS.clear()
        bench_joiner.PIDS.update(server_pids)
        cpu0 = cpu_seconds()
        deadline = time.monotonic() + STEP_TIMEOUT_S + 60
        while sum(shared[0::2]) < total_events or sum(shared[1::2]) < total_examples:
            if time.monotonic() > deadline or not any(p.is_alive() for p in procs):
                break
            time.sleep(0.05)
        cpu1 = cpu_seconds()
        outs: dict[int, dict[str, Any]] = {}
        while len(outs) < processes:
            index, status, payload = results.get(timeout=STEP_TIMEOUT_S)
            if status != "ok":
                raise SystemExit(f"case {name}: joiner {index} failed:\n{payload}")
            outs[index] = payload
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    workers = [outs[i] for i in range(processes)]
    started = min((w for w in workers if w["t0"] is not None), key=lambda w: w["t0"])
    t0, t1 = started["t0"], max(w["end"] for w in workers)
    records = total_events - started["first_batch"]
    # From the moment the last process read its first records: every process running.
    t_all = max(w["t0"] for w in workers)
    before = sum(max((n for t, n in w["trace"] if t <= t_all), default=0) for w in workers)
    on_topic = read_examples(settings, total_examples)
    kinds_emitted: dict[str, int] = {}
    for w in workers:
        for kind, n in w["counts"]["examples"].items():
            kinds_emitted[kind] = kinds_emitted.get(kind, 0) + n
    problems = []
    if on_topic["distinct_ids"] != total_examples:
        problems.append(f"{on_topic['distinct_ids']} distinct example ids on the topic, expected {total_examples}")
    if sum(w["consumed"] for w in workers) < total_events:
        problems.append(f"consumed {[w['consumed'] for w in workers]} of {total_events}")
    if on_topic["kinds"].get("late") or kinds_emitted.get("late"):
        problems.append(f"late examples: {on_topic['kinds']}")
    if any(w["counts"]["dead_letters"] for w in workers):
        problems.append("dead letters")
    if problems:
        raise SystemExit(f"case {name}: WRONG EXAMPLES: " + "; ".join(problems))
    cpu_workers: dict[str, float] = {}
    for i, w in enumerate(workers):
        cpu_workers[f"joiner{i}"] = 1e6 * sum(w["cpu_seconds"].values()) / records
    cpu = {**cpu_workers, **cpu_per_record(cpu0, cpu1, records)}
    return {
        "case": name,
        "label": LABELS[name],
        "processes": processes,
        "redis_cluster": settings.redis_cluster,
        "group_join_seconds": t0 - started["released"],
        "seconds": t1 - t0,
        "records": records,
        "events_per_s": records / (t1 - t0),
        "start_skew_seconds": t_all - t0,
        "events_per_s_all_started": (total_events - before) / (t1 - t_all),
        "rebalanced": any(len(w["assignments"]) > 1 for w in workers),
        "duplicates_on_topic": on_topic["records"] - on_topic["distinct_ids"],
        "examples_on_topic": on_topic,
        "examples_emitted": kinds_emitted,
        "cpu_us_per_event": cpu,
        # Valkey summed over the nodes: which primary owns the case's slot differs between repeats.
        "cpu_us_per_event_by_role": {
            **cpu_workers,
            "valkey": sum(v for k, v in cpu.items() if k.startswith("valkey")),
            "tansu": cpu.get("tansu", 0.0),
        },
        "workers": workers,
    }


# -- the benchmark --------------------------------------------------------------


def joiner_scale(n_events: int, repeats: int) -> dict[str, Any]:
    """Measure the four cases (see the module docstring) ``repeats`` times over ``n_events`` input events."""
    configure_logging("warning")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    info = machine_info()
    info["redis_py"] = importlib.metadata.version("redis")
    t_all = time.perf_counter()
    with LocalServers(Settings(partitions_input=PARTITIONS)) as srv, LocalValkeyCluster(3) as cluster:
        base = msgspec.structs.replace(
            srv.settings,
            topic_predictions=f"bench.scale.{uuid.uuid4().hex[:6]}.predictions",
            topic_labels=f"bench.scale.{uuid.uuid4().hex[:6]}.labels",
        )
        create_topics(base, {base.topic_predictions: PARTITIONS, base.topic_labels: PARTITIONS})
        t = time.perf_counter()
        producer = make_producer(base)
        counts = produce_stream(producer, base, event_stream(n_events // 2, seed=SEED, tag="s"))
        producer.close()
        sentinels = advance_watermark(base, T0 + 10**9, "s", partitions=PARTITIONS)
        produce_seconds = time.perf_counter() - t
        total = counts["prediction"] + counts["label"] + 2 * sentinels
        expected = {"labeled": counts["label"] + sentinels, "unlabeled": counts["prediction"] - counts["label"]}
        print(
            f"produced {counts['prediction']} predictions + {counts['label']} labels + {2 * sentinels} "
            f"watermark sentinels = {total} input events on {PARTITIONS} partitions per topic in "
            f"{produce_seconds:.1f}s; expected examples {expected}",
            flush=True,
        )
        node = redis.Redis.from_url(srv.redis_url)
        info["valkey"] = node.info("server").get("valkey_version")
        pids: dict[str, dict[str, int | str]] = {
            "node": {"valkey": srv.redis.pid if srv.redis else 0},
            "cluster": {f"valkey{i}": p.pid for i, p in enumerate(cluster.procs) if p is not None},
        }
        tansu = {"tansu": srv.kafka.pid if srv.kafka else 0}
        all_pids = {"bench": "self", **tansu, **pids["node"], **pids["cluster"]}
        rounds: list[dict[str, Any]] = []
        for r in range(repeats):
            bench_joiner.PIDS.clear()
            bench_joiner.PIDS.update(all_pids)
            raw = phase_raw_consume(base, total, base.joiner_max_poll_records, partitions=PARTITIONS)
            print(f"repeat {r + 1}: raw consume {raw['events_per_s']:,.0f} records/s", flush=True)
            names = list(CASES)
            order = names[r % len(names) :] + names[: r % len(names)]
            cases: dict[str, Any] = {}
            for name in order:
                processes, on_cluster = CASES[name]
                tag = f"scale-{name}-r{r + 1}"
                s = joiner_settings(
                    base,
                    tag,
                    joiner_window_ms=WINDOW_MS,
                    joiner_late_retention_ms=10_000,
                    joiner_orphan_retention_ms=10_000,
                    topic_examples=f"bench.{tag}.{uuid.uuid4().hex[:6]}.examples",
                )
                if on_cluster:
                    s = msgspec.structs.replace(s, redis_url=cluster.url, redis_cluster=True)
                create_topics(s, {s.topic_examples: 1})
                if on_cluster:
                    for i in cluster.live():
                        c = cluster.client(i)
                        c.flushall()
                        c.close()
                else:
                    node.flushall()
                servers = {**tansu, **(pids["cluster"] if on_cluster else pids["node"])}
                case = run_case(name, s, processes, total, expected, servers)
                cases[name] = case
                print(
                    f"  {case['label']:<24} {case['events_per_s']:>9,.0f} events/s  "
                    f"({case['seconds']:.1f}s, group join {case['group_join_seconds']:.1f}s, "
                    f"rebalanced {case['rebalanced']}, duplicates {case['duplicates_on_topic']}); "
                    f"examples verified {case['examples_on_topic']['kinds']}",
                    flush=True,
                )
            for case in cases.values():
                case["vs_a"] = case["events_per_s"] / cases["a"]["events_per_s"]
                case["vs_raw"] = case["events_per_s"] / raw["events_per_s"]
                case["all_started_vs_a"] = case["events_per_s_all_started"] / cases["a"]["events_per_s"]
            rounds.append({"order": order, "raw_consume": raw, "cases": cases})
        node.close()

    summary: dict[str, Any] = {
        "raw_consume_events_per_s": statistics.median(x["raw_consume"]["events_per_s"] for x in rounds)
    }
    for name in CASES:
        runs = [x["cases"][name] for x in rounds]
        summary[name] = {
            "label": LABELS[name],
            "events_per_s": statistics.median(c["events_per_s"] for c in runs),
            "vs_a": statistics.median(c["vs_a"] for c in runs),
            "vs_raw": statistics.median(c["vs_raw"] for c in runs),
            "per_repeat_events_per_s": [c["events_per_s"] for c in runs],
            "events_per_s_all_started": statistics.median(c["events_per_s_all_started"] for c in runs),
            "all_started_vs_a": statistics.median(c["all_started_vs_a"] for c in runs),
            "start_skew_seconds": [c["start_skew_seconds"] for c in runs],
            "cpu_us_per_event": {
                k: statistics.median(c["cpu_us_per_event_by_role"][k] for c in runs)
                for k in runs[0]["cpu_us_per_event_by_role"]
            },
            "rebalanced": [c["rebalanced"] for c in runs],
            "duplicates_on_topic": [c["duplicates_on_topic"] for c in runs],
        }
    info["loadavg_at_end"] = list(os.getloadavg())
    return {
        "benchmark": "scale_joiner",
        "n_events_asked": n_events,
        "input_events": total,
        "predictions": counts["prediction"],
        "labels": counts["label"],
        "watermark_sentinel_events": 2 * sentinels,
        "expected_examples": expected,
        "partitions": PARTITIONS,
        "features": bench_joiner.N_FEATURES,
        "window_ms": WINDOW_MS,
        "max_poll_records": base.joiner_max_poll_records,
        "repeats": repeats,
        "produce_seconds": produce_seconds,
        "summary": summary,
        "rounds": rounds,
        "wall_seconds": time.perf_counter() - t_all,
        "machine": info,
    }


def print_report(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(
        f"\n{result['input_events']:,} input events ({result['predictions']:,} predictions, {result['labels']:,} "
        f"labels, {result['watermark_sentinel_events']} sentinels), {result['partitions']} partitions per topic, "
        f"max_poll_records {result['max_poll_records']}, median of {result['repeats']} repeat(s)\n"
    )
    head = (
        f"{'case':<26} {'events/s':>9} {'vs (a)':>7} {'vs raw':>7} {'per repeat':>18} {'all started':>11} "
        f"{'vs (a)':>7} {'skew':>5}  {'CPU us/event: joiners':>21} {'valkey':>7} {'tansu':>6}"
    )
    print(head)
    print("-" * len(head))
    print(f"{'raw kafka-python consume':<26} {s['raw_consume_events_per_s']:>9,.0f} {'':>7} {1.0:>7.3f}")
    for name in CASES:
        c = s[name]
        cpu = c["cpu_us_per_event"]
        joiners = " + ".join(f"{v:.1f}" for k, v in cpu.items() if k.startswith("joiner"))
        valkey = cpu["valkey"]
        per = " / ".join(f"{x:,.0f}" for x in c["per_repeat_events_per_s"])
        skew = statistics.median(c["start_skew_seconds"])
        print(
            f"{c['label']:<26} {c['events_per_s']:>9,.0f} {c['vs_a']:>7.3f} {c['vs_raw']:>7.3f} {per:>18} "
            f"{c['events_per_s_all_started']:>11,.0f} {c['all_started_vs_a']:>7.3f} {skew:>4.1f}s  "
            f"{joiners:>21} {valkey:>7.1f} {cpu.get('tansu', 0.0):>6.1f}"
        )
    print(
        "(events/s: from the first process's first records to the last example; all started: from the last "
        "process's first records (skew: how much later), the events consumed after it; vs (a), vs raw: medians "
        "of per-repeat ratios; CPU per timed input event of each joiner process (its own timed window), and of "
        "Valkey (all nodes) and Tansu from the barrier to the last event, the group join included)"
    )
    for name in CASES:
        c = s[name]
        if any(c["rebalanced"]) or any(c["duplicates_on_topic"]):
            print(f"  {c['label']}: rebalanced {c['rebalanced']}, duplicates on the topic {c['duplicates_on_topic']}")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--events",
        type=int,
        default=DEFAULT_EVENTS,
        help="about this many input events: events/2 predictions and their labels (~10%% get none)",
    )
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    result = joiner_scale(args.events, args.repeats)
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} (total {result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
