"""Replay benchmark: replay throughput against raw kafka-python consume and the live pipeline, in one run.

Everything runs in one process against freshly started local servers
(Tansu and Valkey on free ports). Rates on this shared 2-core machine move
between runs; the ratios, each taken against a baseline measured in the
same repeat, move less.

Per repeat, on fresh topics:

1. produce   -- ``--requests`` predictions (16 features, one per ms of
                event time) and their labels (90 %, 1-500 ms later), the
                joiner bench's stream (``bench_joiner.event_stream``), to 3 +
                3 input partitions.
2. live      -- the live pipeline as ``stream-learner run`` hosts it: a
                :class:`~stream_learner.join.joiner.Joiner` and a
                :class:`~stream_learner.learn.trainer.Trainer` (built like
                the CLI builds it, drift detectors on) in two threads. The
                clock starts when the joiner has read its first record (the
                consumer-group join, slow on Tansu, is not counted) and stops
                when the joiner has read every input record and produced
                every example, and the trainer has applied every example
                (``trainer_max_wait_ms`` 50, so the last partial chunk waits
                little). Rate: input events / that time.
3. raw       -- a group-less ``make_consumer`` consumer assigned to the 6
                input partitions reads every record from the beginning, no
                decoding: the ceiling of any kafka-python reader. Measured
                before and after the replay; their mean is the baseline.
4. replay    -- ``Replay(source="events")`` over the whole input range, with
                the default fetch sizes, publishing to the model topic under
                its own lineage: range resolution, merge, decode, the join
                script in Redis, the learner, checkpoints. Rate: input
                events / wall time of ``run()``. A second replay with
                ``poll_records=500`` must end with the same weights digest
                (determinism across fetch sizes), and is timed too.
5. examples  -- ``Replay(source="examples")`` over the examples topic the
                live joiner wrote, against a raw consume of that topic.

Results: ``bench/results/replay.json``; a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
from kafka import TopicPartition

from stream_learner.bus import ensure_topics, make_consumer, make_producer
from stream_learner.checkpoint.signing import generate_keypair
from stream_learner.config import Settings
from stream_learner.join.joiner import Joiner
from stream_learner.learn.trainer import Trainer
from stream_learner.local import LocalServers
from stream_learner.logging import configure_logging
from stream_learner.replay import Replay, ReplayPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import machine_info
from bench_joiner import N_FEATURES, WINDOW_MS, event_stream, produce_stream
from bench_trainer import code_version

RESULTS = Path(__file__).resolve().parent / "results" / "replay.json"


def bench_settings(base: Settings, work: Path, key: Path, tag: str) -> Settings:
    prefix = f"r{tag}"
    return msgspec.structs.replace(
        base,
        **{f"topic_{role}": f"{prefix}.{role}" for role in base.topics},
        partitions_input=3,
        partitions_examples=1,
        joiner_window_ms=WINDOW_MS,
        joiner_idle_advance=False,
        joiner_group_id=f"{prefix}-joiner",
        joiner_redis_prefix="{" + prefix + "}:",
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        trainer_model="bench",
        trainer_features=[f"f{j}" for j in range(N_FEATURES)],
        trainer_classes=["yes", "no"],
        trainer_signing_key=str(key),
        trainer_state_dir=str(work / f"{tag}-state"),
        trainer_group_id=f"{prefix}-trainer",
        trainer_max_wait_ms=50,
        trainer_checkpoint_every_s=3600,
        replay_state_dir=str(work / f"{tag}-replay"),
        log_level="warning",
    )


def raw_consume(settings: Settings, topics: list[str]) -> dict[str, float]:
    """Read every record of ``topics`` from the beginning with a plain group-less consumer."""
    consumer = make_consumer(settings, group_id=None)
    tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends = {tp: consumer.highwater(tp) for tp in tps}
    # The high-water marks come with the first fetch (Tansu's ListOffsets lags, see the README).
    n = 0
    start = time.perf_counter()
    while True:
        for records in consumer.poll(timeout_ms=200).values():
            n += len(records)
        ends = {tp: consumer.highwater(tp) for tp in tps}
        if all(e is not None and consumer.position(tp) >= e for tp, e in ends.items()):
            break
    seconds = time.perf_counter() - start
    consumer.close()
    return {"records": n, "seconds": seconds, "per_s": n / seconds}


def live_pipeline(settings: Settings, total_events: int) -> dict[str, Any]:
    """Joiner and trainer in two threads, timed from the joiner's first record to the trainer's last example."""
    joiner = Joiner(settings, poll_timeout_ms=100)
    trainer = Trainer(settings, poll_timeout_ms=100)
    stop = threading.Event()
    threads = [threading.Thread(target=role.run, args=(stop,), daemon=True) for role in (joiner, trainer)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 600
    while sum(joiner.counts.events.values()) == 0:
        assert time.monotonic() < deadline, "the joiner read nothing"
        time.sleep(0.002)
    start = time.perf_counter()
    while True:
        assert time.monotonic() < deadline, "the live pipeline did not finish"
        time.sleep(0.005)
        if sum(joiner.counts.events.values()) < total_events or joiner.store.pending_outbox():
            continue
        examples = sum(joiner.counts.examples.values())
        if sum(trainer.offsets.values()) >= examples and not trainer.buffer:
            break
    seconds = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join(60)
    return {
        "events": total_events,
        "examples": examples,
        "seconds": seconds,
        "events_per_s": total_events / seconds,
        "trainer_version": trainer.version,
        "labeled": trainer.learner.counts["labeled"],
    }


def timed_replay(settings: Settings, plan: ReplayPlan, **kw: Any) -> dict[str, Any]:
    replay = Replay(settings, plan, progress=False, **kw)
    start = time.perf_counter()
    summary = replay.run()
    seconds = time.perf_counter() - start
    assert summary["done"]
    records = summary["records_read"]
    return {
        "records": records,
        "seconds": seconds,
        "per_s": records / seconds,
        "examples": summary["counts"]["examples"],
        "versions": summary["version"],
        "final_sha256": summary["final_sha256"],
        "stage_seconds": {k: round(v, 3) for k, v in replay.timings.items()}
        | {"read_merge_decode_other": round(seconds - sum(replay.timings.values()), 3)},
    }


def one_repeat(base: Settings, work: Path, key: Path, requests: int, r: int) -> dict[str, Any]:
    tag = f"{r}{uuid.uuid4().hex[:6]}"
    s = bench_settings(base, work, key, tag)
    ensure_topics(s)
    producer = make_producer(s, linger_ms=20)
    counts = produce_stream(producer, s, event_stream(requests, seed=1000 + r, tag=tag))
    producer.close()
    total = sum(counts.values())
    inputs = [s.topic_predictions, s.topic_labels]
    print(f"repeat {r}: {total} events produced", file=sys.stderr)

    live = live_pipeline(s, total)
    print(f"  live pipeline {live['events_per_s']:.0f} events/s", file=sys.stderr)
    raw_before = raw_consume(s, inputs)
    replay = timed_replay(s, ReplayPlan(replay_id=f"ev{tag}"))
    raw_after = raw_consume(s, inputs)
    again = timed_replay(
        s,
        ReplayPlan(replay_id=f"ev2{tag}", lineage=f"bench@replay-ev{tag}", output_dir=str(work / f"{tag}-again")),
        poll_records=500,
    )
    raw_inputs = statistics.mean([raw_before["per_s"], raw_after["per_s"]])
    print(f"  replay {replay['per_s']:.0f} events/s, raw {raw_inputs:.0f}", file=sys.stderr)

    raw_ex_before = raw_consume(s, [s.topic_examples])
    examples = timed_replay(s, ReplayPlan(replay_id=f"ex{tag}", source="examples"))
    raw_ex_after = raw_consume(s, [s.topic_examples])
    raw_examples = statistics.mean([raw_ex_before["per_s"], raw_ex_after["per_s"]])
    return {
        "events": total,
        "counts": counts,
        "live": live,
        "raw_inputs": {"before": raw_before, "after": raw_after, "mean_per_s": raw_inputs},
        "replay_events": replay,
        "replay_events_poll500": again,
        # The replay's join emits what the live joiner emitted (the same windows closed at the end).
        "examples_equal_live": replay["examples"] == live["examples"],
        "digest_equal_across_fetch_sizes": replay["final_sha256"] is not None
        and replay["final_sha256"] == again["final_sha256"],
        "ratio_replay_to_raw": replay["per_s"] / raw_inputs,
        "ratio_replay_to_live": replay["per_s"] / live["events_per_s"],
        "raw_examples": {"before": raw_ex_before, "after": raw_ex_after, "mean_per_s": raw_examples},
        "replay_examples": examples,
        "ratio_examples_replay_to_raw": examples["per_s"] / raw_examples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="predictions per repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    configure_logging("warning", "console")
    info = machine_info()
    repeats = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        private_pem, _ = generate_keypair()
        key = work / "signing.pem"
        key.write_bytes(private_pem)
        with LocalServers(Settings(partitions_input=3), workdir=work / "servers") as servers:
            for r in range(args.repeats):
                repeats.append(one_repeat(servers.settings, work, key, args.requests, r))

    def col(path: str) -> list[float]:
        out = []
        for rep in repeats:
            value: Any = rep
            for part in path.split("."):
                value = value[part]
            out.append(value)
        return out

    summary = {
        k: {"mean": statistics.mean(col(k)), "all": col(k)}
        for k in (
            "replay_events.per_s",
            "raw_inputs.mean_per_s",
            "live.events_per_s",
            "ratio_replay_to_raw",
            "ratio_replay_to_live",
            "replay_examples.per_s",
            "raw_examples.mean_per_s",
            "ratio_examples_replay_to_raw",
        )
    }
    summary["digests_equal_across_fetch_sizes"] = all(col("digest_equal_across_fetch_sizes"))
    summary["examples_equal_live"] = all(col("examples_equal_live"))
    summary["target_ratio_to_raw"] = 0.5
    summary["meets_target"] = summary["ratio_replay_to_raw"]["mean"] >= 0.5
    result = {
        "benchmark": "replay",
        "requests": args.requests,
        "repeats": repeats,
        "summary": summary,
        "machine": info | {"code": code_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'':34}{'mean':>12}  all")
    for k, v in summary.items():
        if isinstance(v, dict):
            print(f"{k:<34}{v['mean']:>12.3f}  " + ", ".join(f"{x:.3f}" for x in v["all"]))
    print(
        f"digests equal across fetch sizes: {summary['digests_equal_across_fetch_sizes']}; "
        f"target (replay >= 0.5 of raw consume) met: {summary['meets_target']}"
    )
    for rep in repeats:
        print("stages (s):", rep["replay_events"]["stage_seconds"], "of", round(rep["replay_events"]["seconds"], 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
