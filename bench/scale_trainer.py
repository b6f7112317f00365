"""Trainer scale-out benchmark: the real ``stream-learner trainer`` at 1, 2 and 4 ranks.

One backlog of joined examples (bench_trainer's workload: 16 features, a
noisy linear rule, 20 % unlabeled) on a 4-partition examples topic, laid out
so every partition holds a quarter. For each model and each case a fresh
trainer (its own state directory, models topic and group) is started as the
command line starts it (``python -m stream_learner trainer``, the settings in
the environment, ``trainer_checkpoint_every_s`` 1) and runs until a
checkpoint holds every example; it is then stopped with SIGTERM.

Cases: 1 rank with 1 torch thread (the reference of the ratios), 1 rank with
2 threads (the same two cores given to one process instead), 2 ranks and 4
ranks with 1 thread each (``trainer_dist_world_size``: torch's elastic agent
launches them, gloo). Models: the default MLP (hidden 64) at the default
batch of 32, and a wide one (hidden 1024, 1024), where the forward and
backward pass -- the only part the ranks split -- is most of a step, at
batches of 32 and 256 (the compute of a step grows with the batch, its
all-reduce, the gradient, does not).

Measured, per case:

* examples/s: from the first to the last checkpoint manifest on the models
  topic, the examples their input offsets add up to over the time between
  their records' timestamps (start-up, the rendezvous and the restore are
  left out, and so is the wait for the last partial batch);
* the all-reduce cost per step: each rank's ``trainer_stopped`` log line
  gives its all-reduce count and seconds (the time a rank waits in the
  collective, which includes waiting for the slowest rank).

What the numbers can show on the 2-core development machine, and what not:

* Each rank decodes, featurizes and scores *every* example of the global
  batch (the records are all-gathered so every rank runs the same learner:
  docs/architecture.md, "Scale-out"); only the forward and backward pass of
  its slice is split. So ranks pay only where that pass dominates a step:
  the wide model, not the default one.
* Two cores hold Tansu, Valkey and every rank. 2 ranks can use at most both
  cores; 4 ranks cannot run faster than 2 and show what oversubscription
  costs (each collective waits for the rank the scheduler left behind).
  1 rank with 2 threads is the fair comparison for 2 ranks here.
* Not shown: ranks on their own hosts (all-reduce over a real network
  grows with the model's size: 2 x its gradient bytes per step for a ring),
  GPUs and nccl, more than 4 ranks.

Run::

    .venv/bin/python bench/scale_trainer.py [--examples N] [--wide-examples N] [--repeats R (3)] [--out FILE]

Results go to ``bench/results/scale_trainer.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_foundation import machine_info
from bench_trainer import FEATURES, MODEL, build_workload

from stream_learner.bus import ensure_topics, make_consumer, make_producer
from stream_learner.checkpoint.signing import generate_keypair
from stream_learner.config import Settings, settings_env
from stream_learner.events import MANIFEST
from stream_learner.local import LocalServers

PARTITIONS = 4
CASES = [(1, 1), (1, 2), (2, 1), (4, 1)]  # (ranks, torch threads per rank)
# name -> (hidden layers, batch size): the default model at the default batch, and a wide one at the
# default batch and at 256, where a step's compute grows 8x and its all-reduce (the gradient) does not.
MODELS = {"mlp64.b32": ([64], 32), "wide1024x2.b32": ([1024, 1024], 32), "wide1024x2.b256": ([1024, 1024], 256)}
TIMEOUT_S = 600.0
DEFAULT_EXAMPLES, DEFAULT_WIDE, DEFAULT_REPEATS = 80_000, 16_000, 3
RESULTS = Path(__file__).parent / "results" / "scale_trainer.json"


def produce(settings: Settings, values: list[tuple[bytes, bytes]]) -> None:
    """Example ``i`` to partition ``i % 4``: every partition a quarter, every rank's share equal."""
    producer = make_producer(settings)
    try:
        for i, (key, value) in enumerate(values):
            producer.send(settings.topic_examples, key=key, value=value, partition=i % PARTITIONS)
        producer.flush()
    finally:
        producer.close()


def manifests(settings: Settings) -> list[tuple[int, int]]:
    """(record timestamp ms, examples read) of every manifest on the models topic so far."""
    from kafka import TopicPartition

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
                        m = MANIFEST.decode(r.value)
                        out.append((r.timestamp, sum(x.offset for x in m.input_offsets)))
        return out
    finally:
        consumer.close()


def run_case(
    base: Settings, tag: str, model: tuple[list[int], int], world: int, threads: int, total: int, logs: Path
) -> dict[str, Any]:
    """One trainer (``world`` ranks of ``threads`` torch threads) over the ``total`` examples of the backlog."""
    s = msgspec.structs.replace(
        base,
        topic_models=f"bench.models.{tag}",
        topic_drift=f"bench.drift.{tag}",
        topic_dlq=f"bench.dlq.{tag}",
        trainer_group_id=f"bench-trainer-{tag}",
        trainer_state_dir=str(logs / tag),
        trainer_hidden=model[0],
        trainer_batch_size=model[1],
        trainer_torch_threads=threads,
        trainer_dist_world_size=world,
    )
    ensure_topics(s)
    env = {**settings_env(s), "PYTHONUNBUFFERED": "1"}
    log_path = logs / f"{tag}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream_learner", "trainer"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{tag}: the trainer ended or stalled: {log_path.read_text()[-2000:]}")
                seen = manifests(s)
                if seen and seen[-1][1] == total:
                    break
                time.sleep(1.0)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    (t0, n0), (t1, n1) = seen[0], seen[-1]
    stopped = []
    for line in log_path.read_text().splitlines():
        if '"trainer_stopped"' in line:
            try:
                stopped.append(json.loads(line[line.index("{") :]))
            except ValueError:
                continue
    reduces = [e for e in stopped if e.get("all_reduces")]
    per_step = [1000 * e["all_reduce_s"] / e["all_reduces"] for e in reduces]
    return {
        "ranks": world,
        "threads": threads,
        "examples_per_s": (n1 - n0) / max((t1 - t0) / 1000, 1e-9),
        "measured_examples": n1 - n0,
        "manifests": len(seen),
        "all_reduce_ms_per_step": statistics.mean(per_step) if per_step else None,
        "all_reduces": reduces[0]["all_reduces"] if reduces else 0,
        "ranks_stopped": len(stopped),
    }


def trainer_scale(examples: int, wide_examples: int, repeats: int) -> dict[str, Any]:
    """Every model x case ``repeats`` times (cases in a rotated order per repeat): the rounds and, per
    model and case, the median examples/s, ratio to 1 rank x 1 thread (per-repeat pairs) and all-reduce ms."""
    began = time.monotonic()
    rounds: list[dict[str, Any]] = []
    produced: set[int] = set()
    with (
        tempfile.TemporaryDirectory(prefix="scale-trainer-") as tmp,
        LocalServers(Settings(partitions_examples=PARTITIONS), Path(tmp) / "servers") as servers,
    ):
        root = Path(tmp)
        key = root / "signing.pem"
        key.write_bytes(generate_keypair()[0])
        key.chmod(0o600)
        base = msgspec.structs.replace(
            servers.settings,
            partitions_examples=PARTITIONS,
            trainer_model=MODEL,
            trainer_features=list(FEATURES),
            trainer_classes=["0", "1"],
            trainer_signing_key=str(key),
            trainer_checkpoint_every_s=1.0,
            log_format="json",
        )
        for model, shape in MODELS.items():
            n = examples if model.startswith("mlp64") else wide_examples
            s = msgspec.structs.replace(base, topic_examples=f"bench.examples.{n}")
            if n not in produced:  # one backlog per size, shared by the models of that size
                produced.add(n)
                ensure_topics(s)
                w = build_workload(n)
                produce(s, list(zip(w.keys, w.values, strict=True)))
            for r in range(repeats):
                for world, threads in CASES[r % len(CASES) :] + CASES[: r % len(CASES)]:
                    res = run_case(s, f"{model}.r{world}.t{threads}.{r}", shape, world, threads, n, root)
                    res.update(model=model, repeat=r)
                    rounds.append(res)
                    print(json.dumps(res), flush=True)
    summary: dict[str, Any] = {}
    for model in MODELS:
        rows = {}
        ref = [x for x in rounds if x["model"] == model and x["ranks"] == 1 and x["threads"] == 1]
        for world, threads in CASES:
            mine = [x for x in rounds if x["model"] == model and x["ranks"] == world and x["threads"] == threads]
            ratios = [a["examples_per_s"] / b["examples_per_s"] for a, b in zip(mine, ref, strict=True)]
            reduce_ms = [x["all_reduce_ms_per_step"] for x in mine if x["all_reduce_ms_per_step"] is not None]
            rows[f"{world} ranks x {threads} threads"] = {
                "examples_per_s": statistics.median(x["examples_per_s"] for x in mine),
                "vs_1x1": statistics.median(ratios),
                "all_reduce_ms_per_step": statistics.median(reduce_ms) if reduce_ms else None,
            }
        summary[model] = rows
    return {
        "benchmark": "scale_trainer",
        "partitions": PARTITIONS,
        "examples": {"mlp64": examples, "wide1024x2": wide_examples},
        "models": {m: {"hidden": h, "batch": b} for m, (h, b) in MODELS.items()},
        "repeats": repeats,
        "summary": summary,
        "rounds": rounds,
        "wall_seconds": time.monotonic() - began,
        "machine": machine_info(),
    }


def print_report(result: dict[str, Any]) -> None:
    """The summary table of :func:`trainer_scale`."""
    print(
        f"\ntrainer: {result['partitions']} partitions, median of {result['repeats']} repeat(s); "
        "vs 1x1: median of per-repeat ratios to 1 rank x 1 thread"
    )
    head = f"{'model':<16} {'case':<22} {'examples/s':>11} {'vs 1x1':>7} {'all-reduce ms/step':>19}"
    print(head)
    print("-" * len(head))
    for model, rows in result["summary"].items():
        for case, row in rows.items():
            ms = "-" if row["all_reduce_ms_per_step"] is None else f"{row['all_reduce_ms_per_step']:.3f}"
            print(f"{model:<16} {case:<22} {row['examples_per_s']:>11,.0f} {row['vs_1x1']:>7.3f} {ms:>19}")
    print()


def main(argv: list[str] | None = None) -> int:
    """Run :func:`trainer_scale`, print its table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="examples for the default MLP")
    parser.add_argument("--wide-examples", type=int, default=DEFAULT_WIDE, help="examples for the wide MLP")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = trainer_scale(args.examples, args.wide_examples, args.repeats)
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
