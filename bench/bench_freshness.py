"""Freshness and swap benchmark: how soon a label reaches the served model, and what a swap costs.

Part 1, **freshness** (the whole loop, as the main job runs it): for each
``--rates`` value, :func:`stream_learner.tools.demo.run_demo` on fresh local
servers, ``--seconds`` of traffic with no drift: the application sends
requests to a real ``stream-learner serve`` process over HTTP, labels
follow after 0.05-1.2 s (10 % never, 5 % after the window), a ``stream-learner
run`` process joins and trains (checkpoint every second). For every label:
the time from the application sending it to the node serving a version
whose manifest's applied offsets include that label's example. p50/p99 and
the event rate reached (predictions + labels per second). Baseline in the
same run: the checkpoint interval (1 s), which bounds what any checkpoint-
based scheme reaches.

Part 2, **swap latency** of a model of about 1M parameters (MLP 256 ->
1024 -> 768 -> 2, 1.05M float32 parameters, 4.2 MB of safetensors in
512 KiB chunks): a :class:`~stream_learner.serving.CheckpointSubscriber`
follows the model topic while ``--versions`` checkpoints are published one
at a time; per version, the time from the manifest being acknowledged by
the broker to ``on_swap`` (read, verify signature and digest, build, smoke
test, swap), with ``consumer_fetch_max_wait_ms`` 50 (as the demo) and
500 (the default; on Tansu an empty fetch is held that long even when a
record arrives, see the README). Baseline in the same run: a raw group-less kafka-python
consumer reading the same records (chunks + manifest) without doing
anything with them, so ``swap / raw_read`` is the subscriber's own cost.
Also: the p99 latency of ``predict_one`` calls from 2 threads while the
swaps happen, against the same calls with no swaps (the swap is one
reference assignment; requests must not notice it).

Writes ``bench/results/freshness.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import torch
from kafka import TopicPartition

from stream_learner.bus import make_consumer, make_producer
from stream_learner.checkpoint import encode_tensors, generate_keypair, load_private_key, load_public_key
from stream_learner.checkpoint.publish import publish_checkpoint, weights_info
from stream_learner.config import Settings
from stream_learner.events import CheckpointManifest
from stream_learner.learn.models import ModelSpec, build_model
from stream_learner.local import LocalServers
from stream_learner.serving import CheckpointSubscriber
from stream_learner.tools.demo import DemoConfig, run_demo

RESULTS = Path(__file__).parent / "results" / "freshness.json"
SPEC = ModelSpec(
    kind="mlp", task="binary", features=[f"f{i}" for i in range(256)], classes=["0", "1"], hidden=[1024, 768]
)


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]


def freshness(
    rate: float,
    seconds: float,
    base: Settings | None = None,
    variants: tuple[str, ...] | None = None,
    checkpoint_every_s: float = 1.0,
) -> dict[str, Any]:
    """One run of the main job's loop at ``rate`` requests/s, no drift; its freshness numbers.

    ``base`` carries settings the demo does not set itself (another architecture, a frozen base:
    ``bench_large.py``); ``variants`` replaces the demo's list of serving variants.
    """
    out = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    config = DemoConfig(rate=rate, seconds=seconds, drift_at=1.0, out=out, checkpoint_every_s=checkpoint_every_s)
    if variants is not None:
        config = dataclasses.replace(config, variants=variants)
    t = time.monotonic()
    summary = run_demo(base or Settings(), config, progress=False)
    wall = time.monotonic() - t
    requests, labels = summary["requests"], summary["labels"]
    if requests["failed"] or not summary["complete"]:
        raise SystemExit(f"freshness run at {rate}/s was not clean: {json.dumps(summary)}")
    return {
        "rate_requested": rate,
        "seconds": seconds,
        "wall_s": round(wall, 1),
        "events_per_s": round((requests["answered"] + labels["sent"]) / seconds, 1),
        "labels": summary["freshness_s"]["labels"],
        "p50_s": summary["freshness_s"]["p50"],
        "p99_s": summary["freshness_s"]["p99"],
        "checkpoints": summary["checkpoints"]["published"],
        "baseline_checkpoint_interval_s": checkpoint_every_s,
        "request_latency_ms": summary["latency_ms"],
        "logs": str(out),  # run.log and serve.log: what bench_large.py reads the stages from
    }


def servable(version: int) -> dict[str, torch.Tensor]:
    """Servable weights of SPEC, different per version."""
    torch.manual_seed(version)
    model = build_model(SPEC)
    n = len(SPEC.features)
    zeros = torch.zeros(n, dtype=torch.float64)
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    tensors.update(
        {
            "featurizer.count": zeros,
            "featurizer.mean": zeros.clone(),
            "featurizer.m2": zeros.clone(),
            "target": torch.zeros(3, dtype=torch.float64),
        }
    )
    return tensors


def swaps(versions: int, fetch_max_wait_ms: int) -> dict[str, Any]:
    """Swap latency of a ~1M-parameter model against a raw read of the same records."""
    private_pem, public_pem = generate_keypair()
    key, public = load_private_key(private_pem), load_public_key(public_pem)
    params = sum(p.numel() for p in build_model(SPEC).parameters())
    with LocalServers(Settings()) as servers:
        settings = msgspec.structs.replace(
            servers.settings, trainer_model="big", consumer_fetch_max_wait_ms=fetch_max_wait_ms
        )
        producer = make_producer(settings)
        # Encoded up front: the publisher's own cost is not the subscriber's.
        payloads = [encode_tensors(servable(v), {"model": "big"}) for v in range(1, versions + 1)]
        swapped: dict[int, float] = {}
        done = threading.Condition()

        def on_swap(new: Any, old: Any) -> None:
            with done:
                swapped[new.version] = time.monotonic()
                done.notify_all()

        row = {f"f{i}": float(i % 7) for i in range(256)}
        sub = CheckpointSubscriber(settings, public, model="big", on_swap=on_swap).start(wait_s=None)
        latencies: dict[str, list[float]] = {"quiet": [], "swapping": []}
        phase = ["quiet"]
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                served = sub.current
                if served is None:
                    time.sleep(0.001)
                    continue
                t = time.perf_counter()
                served.predict_one(row)
                latencies[phase[0]].append(time.perf_counter() - t)

        publish_ack: dict[int, float] = {}
        records: dict[int, tuple[int, int]] = {}  # version -> (first offset, end offset)

        def publish(version: int) -> None:
            data = payloads[version - 1]
            manifest = CheckpointManifest(
                model="big",
                version=version,
                parent=version - 1 or None,
                created_at=int(time.time() * 1000),
                input_offsets=[],
                counts={},
                metrics={},
                drift_state={},
                feature_spec=list(SPEC.features),
                architecture=SPEC.to_dict(),
                weights=weights_info(data),
            )
            signed = publish_checkpoint(producer, settings.topic_models, manifest, data, key)
            publish_ack[version] = time.monotonic()
            offsets = signed.weights.chunk_offsets
            records[version] = (offsets[0], offsets[-1] + 2)  # chunks, then the manifest

        publish(1)
        with done:
            done.wait_for(lambda: 1 in swapped, timeout=60)
        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]  # a failed run still exits
        for t in threads:
            t.start()
        time.sleep(3.0)  # predict latency with no swaps
        phase[0] = "swapping"
        for v in range(2, versions + 1):
            publish(v)
            with done:
                if not done.wait_for(lambda v=v: v in swapped, timeout=60):
                    raise SystemExit(f"version {v} was not swapped in: {sub.status()}")
        stop.set()
        for t in threads:
            t.join()
        status = sub.status()
        sub.stop()
        producer.close()

        # Baseline: the same records read raw, one version at a time.
        consumer = make_consumer(settings, None)
        tp = TopicPartition(settings.topic_models, 0)
        consumer.assign([tp])
        raw: list[float] = []
        for v in range(2, versions + 1):
            lo, hi = records[v]
            t = time.monotonic()
            consumer.seek(tp, lo)
            got = 0
            while got < hi - lo:
                got += sum(len(rs) for rs in consumer.poll(timeout_ms=1000, max_records=hi - lo - got).values())
            raw.append(time.monotonic() - t)
        consumer.close()
    swap = [swapped[v] - publish_ack[v] for v in range(2, versions + 1)]
    quiet, busy = latencies["quiet"], latencies["swapping"]
    return {
        "consumer_fetch_max_wait_ms": fetch_max_wait_ms,
        "parameters": params,
        "weights_bytes": len(payloads[0]),
        "versions": versions - 1,
        "swap_p50_s": round(quantile(swap, 0.5), 4),
        "swap_p99_s": round(quantile(swap, 0.99), 4),
        "swap_mean_s": round(statistics.fmean(swap), 4),
        "raw_read_p50_s": round(quantile(raw, 0.5), 4),
        "raw_read_p99_s": round(quantile(raw, 0.99), 4),
        "swap_over_raw_read_p50": round(quantile(swap, 0.5) / quantile(raw, 0.5), 2),
        "failures": status["failures"],
        "predict_calls": {"quiet": len(quiet), "swapping": len(busy)},
        "predict_p99_ms": {
            "quiet": round(quantile(quiet, 0.99) * 1e3, 3),
            "swapping": round(quantile(busy, 0.99) * 1e3, 3),
        },
        "predict_p99_swapping_over_quiet": round(quantile(busy, 0.99) / quantile(quiet, 0.99), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[200.0, 600.0], help="requests per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of traffic per rate")
    parser.add_argument("--versions", type=int, default=41, help="checkpoints published in the swap part")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__},
        "swap": [swaps(args.versions, wait) for wait in (50, Settings().consumer_fetch_max_wait_ms)],
    }
    print(json.dumps({"swap": results["swap"]}, indent=2), flush=True)
    results["freshness"] = [freshness(rate, args.seconds) for rate in args.rates]
    print(json.dumps({"freshness": results["freshness"]}, indent=2))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
