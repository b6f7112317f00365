"""Decode cost of the v2 wire contract: a 16-number prediction decoded as prediction.v2 against the same
bytes decoded with the v1 shape (``events_v1``), interleaved in one process, and a v2 prediction that
also holds a category, an 8-number vector and a short text.

    python bench/bench_decode_v2.py [--events 50000] [--rounds 30]

Both codecs run the same ``Codec.decode`` (the fast quote-count proof included), so the ratio is the
cost of the wider feature type alone. Results: stdout (bench/README.md quotes a run).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_foundation import build_workload

from stream_learner.events import PREDICTION, PredictionEvent, encode
from stream_learner.events_v1 import PREDICTION_V1


def timed(decode: object, values: list[bytes]) -> float:
    """µs per event of one pass of ``decode`` over ``values``."""
    dec = decode
    t0 = time.perf_counter()
    for v in values:
        dec(v)  # type: ignore[operator]
    return (time.perf_counter() - t0) / len(values) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    w = build_workload(args.events)
    rng = random.Random(3)
    mixed = []
    for i, feats in enumerate(w.features):
        f: dict[str, object] = dict(feats)
        f.update(plan=rng.choice(["basic", "premium", "gold"]), emb=[rng.gauss(0, 1) for _ in range(8)])
        f["review"] = "great product, would buy again"
        event = PredictionEvent(
            event_id=f"e{i}",
            request_id=f"r{i}",
            model="m",
            model_version="1",
            event_time=1_700_000_000_000 + i,
            features=f,  # type: ignore[arg-type]
            prediction={"yes": 0.5, "no": 0.5},
        )
        mixed.append(encode(event))
    runs: dict[str, list[float]] = {"v1 shape": [], "v2": [], "v2 mixed": []}
    for r in range(args.rounds):
        order = [("v1 shape", PREDICTION_V1.decode), ("v2", PREDICTION.decode)]
        for name, decode in order if r % 2 == 0 else order[::-1]:
            runs[name].append(timed(decode, w.values))
        runs["v2 mixed"].append(timed(PREDICTION.decode, mixed))
    for name, xs in runs.items():
        print(f"{name:9s} median {statistics.median(xs):6.3f}  min {min(xs):6.3f} µs/event ({len(xs)} rounds)")
    ratio = statistics.median(runs["v2"]) / statistics.median(runs["v1 shape"])
    print(f"v2 / v1 shape on the 16-number prediction: {ratio:.3f} (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
