"""Shadow traffic's cost to the champion's requests (``serving_shadow``; stream_learner/serving/shadow.py).

An in-process :class:`~stream_learner.serving.ServingNode` (no broker: the
champion and the challenger are untrained MLPs of the same spec, 9 features,
hidden 64-64, 2 classes, set directly), one HTTP/1.1 keep-alive client
sending ``--requests`` single-instance ``POST /predict`` one after another.
Per round, the node without a shadow then with one (the worker gathering,
predicting and logging JSON ``shadow_prediction`` lines to /dev/null),
interleaved ``--rounds`` times; the first 500 latencies of each run are
dropped. Prints and writes ``bench/results/shadow.json``: per configuration,
the medians over rounds of the p50 and p99 request latency (ms).

    PYTHONPATH=. python bench/bench_shadow.py --requests 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

from stream_learner.checkpoint.signing import generate_keypair, load_public_key
from stream_learner.config import Settings
from stream_learner.logging import configure_logging
from stream_learner.metrics import Metrics
from stream_learner.serving import ServingNode, cold_start_model
from stream_learner.serving.model import ServedModel
from stream_learner.serving.shadow import Shadow
from tests.serving.stand_ins import FixedSource  # run with PYTHONPATH=. (the docstring's command)

FEATURES = [f"f{i}" for i in range(9)]


def run(settings: Settings, champion: ServedModel, challenger: ServedModel | None, n: int) -> tuple[float, float]:
    """p50 and p99 (ms) of ``n`` sequential requests, the first 500 dropped."""
    metrics = Metrics(roles=["serving"])
    shadow = None
    if challenger is not None:
        shadow = Shadow(settings, load_public_key(generate_keypair()[1]), metrics=metrics)
        shadow.subscriber = FixedSource(challenger)  # type: ignore[assignment]
        shadow.start()
    node = ServingNode(FixedSource(champion), metrics=metrics, shadow=shadow).start()
    host, port = node.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    body = json.dumps({"features": dict.fromkeys(FEATURES, 1.0)}).encode()
    latencies = []
    try:
        for _ in range(n):
            began = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            conn.getresponse().read()
            latencies.append(time.perf_counter() - began)
    finally:
        conn.close()
        node.stop()
        if shadow is not None:
            shadow.stop()
    kept = sorted(latencies[500:])
    return statistics.median(kept) * 1e3, kept[int(len(kept) * 0.99)] * 1e3


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.stderr = open("/dev/null", "w")  # the shadow lines are rendered and written, not kept
    configure_logging("info", "json")
    settings = Settings(
        trainer_model="m", trainer_features=FEATURES, trainer_classes=["0", "1"], trainer_hidden=[64, 64]
    )
    champion = cold_start_model(settings)
    challenger = dataclasses.replace(cold_start_model(settings), model="m#challenger")
    results: dict[str, list[tuple[float, float]]] = {"no_shadow": [], "shadow": []}
    for _ in range(args.rounds):
        results["no_shadow"].append(run(settings, champion, None, args.requests))
        results["shadow"].append(run(settings, champion, challenger, args.requests))
    summary = {
        name: {
            "p50_ms": round(statistics.median(p for p, _ in runs), 3),
            "p99_ms": round(statistics.median(q for _, q in runs), 3),
        }
        for name, runs in results.items()
    }
    out = {"requests": args.requests, "rounds": args.rounds, "summary": summary, "runs": results}
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/shadow.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
