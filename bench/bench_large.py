"""A large model on a frozen base: bytes per published version (full, head-only, LoRA), delta swaps, memory.

The model is the issue's target shape, ``stream_learner.learn.encoder:token_encoder_large``: a
100,000 x 512 token embedding (51.2M parameters) and six 512-wide transformer blocks with a
1024-wide feed-forward (12.6M), 63.8M parameters in all. Its "pretrained" base is every tensor but
the head, written to a safetensors file (float32, 255 MB) the trainer and the node are given.

In one process:

1. **Bytes per published version.** For each selection — ``head`` (the head learns), ``lora``
   (rank-8 adapters on every block's ``q``, ``k``, ``v``, ``o``, plus the head) — the real
   :class:`~stream_learner.learn.learner.OnlineLearner` learns a few chunks of 32 Agrawal
   examples on the base, then the bytes a version publishes are computed by the trainer's own
   function (:func:`~stream_learner.learn.manifest.weights_bytes`): full (every tensor, what a
   model without a frozen base publishes every version, and what a full checkpoint holds) and
   the delta, in float32, float16 and bfloat16. The ratios are delta / full in the same dtype.
2. **Delta swaps.** The serving node's loader (:func:`~stream_learner.serving.model.load_served_model`
   with the base held, as ``serving_base_weights`` makes it) turns the bytes of real LoRA deltas
   (one per chunk learned) into a served model, ``--swaps`` times round-robin, each replacing the
   last as a node's swap does: decode, compose with the base, strict checks, build, smoke
   prediction. p50/p99 of that, and the process's RSS before, after the first swaps and at the
   end (flat means the base is shared, not copied, per version). A few full swaps for comparison.
   Fetching the chunks from the broker is not included (see bench_freshness.py for a topic).
   Memory is flat if the RSS after the last swap is within 1 % (or 10 MB) of the RSS after 10.
3. **Label -> served freshness** through the real pipeline, with LoRA deltas (deltas only:
   ``trainer_full_checkpoint_every=0``): ``bench_freshness.freshness`` (the main job's loop, no
   drift: Tansu, Valkey, a ``stream-learner run`` process, a ``stream-learner serve`` node given the
   base, the application sending ``--rate`` requests/s over HTTP and labels through the SDK,
   checkpoint every second) once for the large model and, as the baseline in the same run, once for
   the same pipeline with a small ``token_encoder`` (vocab 1000 x 32, two blocks; LoRA on the same
   layers of its blocks) on its own base. Per label: the time from the application sending it to
   the node serving a version trained on its example; p50/p99.

Run::

    .venv/bin/python bench/bench_large.py [--swaps 500] [--chunks 6] [--rate 20] [--freshness-seconds 60]

Results go to ``bench/results/large.json``. On 2 shared cores, read the ratios; the milliseconds
move with the neighbours.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from stream_learner.checkpoint.codec import decode_tensors, encode_tensors
from stream_learner.checkpoint.reader import LoadedCheckpoint
from stream_learner.learn.frozen import load_base
from stream_learner.learn.learner import LearnerConfig, OnlineLearner
from stream_learner.learn.manifest import build_manifest, layout_for, weights_bytes
from stream_learner.learn.models import ModelSpec, build_model, parameter_count
from stream_learner.serving.model import BuildPolicy, load_served_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_freshness import freshness

from stream_learner.config import Settings
from tests.learn.streams import AGRAWAL_FEATURES, agrawal_examples

ARCH = "stream_learner.learn.encoder:token_encoder_large"
LORA = tuple(f"blocks.{i}.{m}" for i in range(6) for m in ("q", "k", "v", "o"))
#: The freshness baseline: the same factory family at its small default size (two blocks).
SMALL = "stream_learner.learn.encoder:token_encoder"
SMALL_LORA = tuple(f"blocks.{i}.{m}" for i in range(2) for m in ("q", "k", "v", "o"))


def rss_mb() -> float:
    """The resident set size now (MB), from /proc (ru_maxrss is only the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spec(trainable: str) -> ModelSpec:
    lora = trainable == "lora"
    return ModelSpec(
        kind=ARCH,
        task="binary",
        features=AGRAWAL_FEATURES,
        classes=["0", "1"],
        seed=1,
        lora_layers=LORA if lora else (),
        lora_rank=8 if lora else 0,
        lora_alpha=16.0 if lora else 0.0,
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def lora_settings(arch: str, base_path: Path, layers: tuple[str, ...]) -> Settings:
    """The trainer's and the node's settings for ``arch`` learning LoRA deltas on ``base_path``."""
    return Settings(
        trainer_architecture=arch,
        trainer_base_weights=str(base_path),
        trainer_trainable="lora",
        trainer_lora_layers=list(layers),
        trainer_head_modules=["head"],
        trainer_full_checkpoint_every=0,  # deltas only: a 256 MB full version every 10 s is another bench
        serving_base_weights=str(base_path),
        serving_allowed_architectures=[arch],
        serving_max_parameters=100_000_000,
    )


def freshness_side_by_side(
    base_path: Path, tmp: Path, rate: float, seconds: float, checkpoint_every_s: float = 1.0
) -> dict[str, Any]:
    """Label -> served freshness for the large model and the small baseline, one after the other."""
    small = ModelSpec(kind=SMALL, task="binary", features=AGRAWAL_FEATURES, classes=["0", "1"])
    state = build_model(small).state_dict()
    small_base = tmp / "small-base.safetensors"
    small_base.write_bytes(encode_tensors({k: v for k, v in state.items() if not k.startswith("head.")}))
    out: dict[str, Any] = {}
    for name, arch, path, layers in (
        ("small", SMALL, small_base, SMALL_LORA),
        ("large", ARCH, base_path, LORA),
    ):
        row = freshness(rate, seconds, lora_settings(arch, path, layers), (), checkpoint_every_s)
        row["parameters"] = sum(t.numel() for t in build_model(spec_for(arch, layers)).state_dict().values())
        row["stages"] = stages(Path(row["logs"]))
        out[name] = row
        st, lat = row["stages"], row["request_latency_ms"]
        print(
            f"  {name:6} {row['parameters'] / 1e6:6.2f}M parameters: {row['labels']} labels, "
            f"p50 {row['p50_s']} s, p99 {row['p99_s']} s, {row['checkpoints']} checkpoints "
            f"({row['events_per_s']} events/s, {row['wall_s']} s wall)\n"
            f"         checkpoint interval p50 {st['checkpoint_interval_p50_s']} s, "
            f"p99 {st['checkpoint_interval_p99_s']} s; "
            f"publish -> swapped p50 {st['publish_to_swap_p50_s']} s, p99 {st['publish_to_swap_p99_s']} s; "
            f"request p50 {lat['p50']} ms, p99 {lat['p99']} ms",
            flush=True,
        )
    return out


def stages(logs: Path) -> dict[str, float]:
    """Where a run's freshness goes, from its logs: the trainer's interval between checkpoints
    (``checkpoint_published``) and each version's publish -> swapped at the node (``model_swapped``,
    whose ``seconds`` is the node's own load: verify, compose with the base, build, smoke test)."""

    def events(name: str, event: str) -> list[dict[str, Any]]:
        out = []
        for line in (logs / name).read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == event:
                e["t"] = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
                out.append(e)
        return out

    published = {e["version"]: e["t"] for e in events("run.log", "checkpoint_published") if "size" in e}
    swapped = {e["version"]: e for e in events("serve.log", "model_swapped")}
    versions = sorted(published)
    gaps = [published[b] - published[a] for a, b in itertools.pairwise(versions)]
    lag = [swapped[v]["t"] - published[v] for v in versions if v in swapped]
    load = [swapped[v]["seconds"] for v in versions if v in swapped]
    return {
        "checkpoint_interval_p50_s": round(pct(gaps, 0.5), 3),
        "checkpoint_interval_p99_s": round(pct(gaps, 0.99), 3),
        "publish_to_swap_p50_s": round(pct(lag, 0.5), 3),
        "publish_to_swap_p99_s": round(pct(lag, 0.99), 3),
        "node_load_p50_s": round(pct(load, 0.5), 3),
        "node_load_p99_s": round(pct(load, 0.99), 3),
    }


def spec_for(arch: str, layers: tuple[str, ...]) -> ModelSpec:
    """``arch`` with rank-8 adapters on ``layers``, on the meta device's terms (only counted)."""
    return ModelSpec(
        kind=arch,
        task="binary",
        features=AGRAWAL_FEATURES,
        classes=["0", "1"],
        lora_layers=layers,
        lora_rank=8,
        lora_alpha=16.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--swaps", type=int, default=500, help="delta swaps at the node (the issue: 500)")
    parser.add_argument("--chunks", type=int, default=6, help="chunks learned per selection (one delta each)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s of the freshness runs")
    parser.add_argument("--freshness-seconds", type=float, default=60.0, help="seconds of traffic per run; 0: skip")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "large.json")
    parser.add_argument(
        "--checkpoint-every-s", type=float, default=1.0, help="the trainer's checkpoint interval in the freshness runs"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # as trainer_torch_threads and a serving node default to
    out: dict[str, Any] = {"model": ARCH, "load_average_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        plain = build_model(spec("head"))
        state = plain.state_dict()
        out["parameters"] = sum(t.numel() for t in state.values())
        out["embedding_parameters"] = state["embed.weight"].numel()
        base_path = Path(tmp) / "base.safetensors"
        base_path.write_bytes(encode_tensors({k: v for k, v in state.items() if not k.startswith("head.")}))
        del plain, state
        t = time.perf_counter()
        base = load_base(base_path)
        out["base"] = {"bytes": base.size, "load_and_hash_s": round(time.perf_counter() - t, 3)}
        print(f"model {out['parameters'] / 1e6:.1f}M parameters ({out['embedding_parameters'] / 1e6:.1f}M embedding)")
        print(f"base file {base.size / 1e6:.1f} MB, read and hashed in {out['base']['load_and_hash_s']} s")

        stream = agrawal_examples(32 * args.chunks, seed=3)
        sizes: dict[str, dict[str, int]] = {}
        deltas: list[tuple[Any, bytes]] = []
        full_lora: tuple[Any, bytes] | None = None
        for trainable in ("head", "lora"):
            config = LearnerConfig(
                model_name="m", spec=spec(trainable), base=base, trainable=trainable, head_modules=("head",)
            )
            learner = OnlineLearner(config)
            learning = parameter_count(learner.main.model)
            steps = []
            for i in range(args.chunks):
                t = time.perf_counter()
                learner.process(stream[32 * i : 32 * (i + 1)])
                steps.append(time.perf_counter() - t)
                if trainable == "lora":
                    tensors, _ = learner.state_dict()
                    layout = layout_for(learner, i + 1, dtype="float32", full_every=0, full=False)
                    data = weights_bytes(tensors, "m", layout)
                    manifest = build_manifest(
                        learner,
                        model="m",
                        version=i + 1,
                        parent=None,
                        input_offsets=[],
                        weights=data,
                        chunk_bytes=512 * 1024,
                        layout=layout,
                    )
                    deltas.append((manifest, data))
            tensors, _ = learner.state_dict()
            row: dict[str, int] = {"learning_parameters": learning}
            for dtype in ("float32", "float16", "bfloat16"):
                for kind in ("delta", "full"):
                    layout = layout_for(learner, 1, dtype=dtype, full_every=0, full=kind == "full")
                    frozen = learner.frozen_tensors() if kind == "full" else None
                    data = weights_bytes(tensors, "m", layout, frozen)
                    row[f"{kind}_{dtype}"] = len(data)
                    if trainable == "lora" and kind == "full" and dtype == "float32":
                        manifest = build_manifest(
                            learner,
                            model="m",
                            version=99,
                            parent=None,
                            input_offsets=[],
                            weights=data,
                            chunk_bytes=512 * 1024,
                            layout=layout,
                        )
                        full_lora = (manifest, data)
            row["chunk_ms_p50"] = round(statistics.median(steps) * 1000, 1)  # type: ignore[assignment]
            sizes[trainable] = row
            del learner
        out["bytes"] = sizes

        print("\nbytes per published version (delta / full in the same dtype)")
        print(f"{'':10} {'learning':>12} {'dtype':>9} {'full':>14} {'delta':>12} {'delta/full':>11}")
        for trainable, row in sizes.items():
            for dtype in ("float32", "float16", "bfloat16"):
                full, delta = row[f"full_{dtype}"], row[f"delta_{dtype}"]
                print(
                    f"{trainable:10} {row['learning_parameters']:>12,} {dtype:>9} {full:>14,} {delta:>12,} "
                    f"{100 * delta / full:>10.3f}%"
                )
        head_ms, lora_ms = sizes["head"]["chunk_ms_p50"], sizes["lora"]["chunk_ms_p50"]
        print(f"learning one chunk of 32 (p50): head {head_ms} ms, lora {lora_ms} ms")

        # -- the node's side: delta swaps on a held base ---------------------------------------
        node_base = load_base(base_path, what="serving_base_weights")
        del base
        policy = BuildPolicy.of([ARCH], max_parameters=100_000_000, bases=[node_base])
        rows = [ex.features for ex in agrawal_examples(1, seed=9)]
        current = None
        before = rss_mb()
        swap_s: list[float] = []
        swap_cpu: list[float] = []  # this thread's CPU time: what the swap costs, without the neighbours' share
        rss: list[float] = []
        for i in range(args.swaps):
            manifest, data = deltas[i % len(deltas)]
            t, c = time.perf_counter(), time.thread_time()
            tensors, metadata = decode_tensors(data)
            current = load_served_model(LoadedCheckpoint(manifest, tensors, metadata, "t", 0, i), policy)
            swap_s.append(time.perf_counter() - t)
            swap_cpu.append(time.thread_time() - c)
            current.predict(rows)
            rss.append(rss_mb())
        del current
        full_s: list[float] = []
        assert full_lora is not None
        for _ in range(5):
            t = time.perf_counter()
            tensors, metadata = decode_tensors(full_lora[1])
            full_model = load_served_model(LoadedCheckpoint(full_lora[0], tensors, metadata, "t", 0, 0), policy)
            full_s.append(time.perf_counter() - t)
            del full_model, tensors
        out["swaps"] = {
            "count": args.swaps,
            "delta_bytes": len(deltas[0][1]),
            "delta_p50_ms": round(pct(swap_s, 0.5) * 1000, 2),
            "delta_p99_ms": round(pct(swap_s, 0.99) * 1000, 2),
            "delta_max_ms": round(max(swap_s) * 1000, 2),
            "delta_cpu_p50_ms": round(pct(swap_cpu, 0.5) * 1000, 2),
            "delta_cpu_p99_ms": round(pct(swap_cpu, 0.99) * 1000, 2),
            "full_bytes": len(full_lora[1]),
            "full_p50_ms": round(pct(full_s, 0.5) * 1000, 1),
            "rss_mb_before": round(before, 1),
            "rss_mb_after_10": round(rss[min(9, len(rss) - 1)], 1),
            "rss_mb_end": round(rss[-1], 1),
            "rss_mb_max_during_delta_swaps": round(max(rss), 1),
            "rss_mb_every_100": [round(r, 1) for r in rss[99::100]],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        growth = rss[-1] - rss[min(9, len(rss) - 1)]
        out["swaps"]["rss_growth_mb_after_10"] = round(growth, 1)
        # Flat: within 1 % or 10 MB, the noise of the allocator's arenas; a copy of the base per
        # version would grow by 255 MB a swap.
        out["swaps"]["rss_flat"] = growth <= max(10.0, 0.01 * rss[min(9, len(rss) - 1)])
        out["load_average_at_end"] = list(os.getloadavg())
        s = out["swaps"]
        print(f"\nnode: {args.swaps} LoRA delta swaps ({s['delta_bytes']:,} bytes each) on the held base")
        print(f"  delta swap p50 {s['delta_p50_ms']} ms, p99 {s['delta_p99_ms']} ms, max {s['delta_max_ms']} ms (wall)")
        print(f"  delta swap CPU p50 {s['delta_cpu_p50_ms']} ms, p99 {s['delta_cpu_p99_ms']} ms (this thread)")
        print(f"  full swap ({s['full_bytes']:,} bytes) p50 {s['full_p50_ms']} ms")
        print(
            f"  RSS {s['rss_mb_before']} MB before, {s['rss_mb_after_10']} MB after 10 swaps, {s['rss_mb_end']} MB "
            f"after {args.swaps} (max {s['rss_mb_max_during_delta_swaps']} MB during the delta swaps): "
            f"{'flat' if s['rss_flat'] else 'NOT flat'} ({s['rss_growth_mb_after_10']:+} MB after the 10th)"
        )
        del node_base, policy, full_lora, deltas
        if args.freshness_seconds > 0:
            print(f"\nlabel -> served freshness at {args.rate:g} requests/s, LoRA deltas (the real pipeline)")
            out["freshness"] = freshness_side_by_side(
                base_path, Path(tmp), args.rate, args.freshness_seconds, args.checkpoint_every_s
            )
            out["load_average_at_end"] = list(os.getloadavg())
    results = args.out
    results.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n-> {results}")


if __name__ == "__main__":
    main()
