"""Pseudo-label recipes at 10 % labels (issue 14), against pseudo-labels off: an experiment.

The recipes are LearnerConfig options of this commit only (``pseudo_mix``,
``pseudo_suspend_batches``, ``pseudo_teacher_decay``); none raised accuracy by a
point, so the next commit removes them and turns pseudo-labels off by default
(bench/README.md, "Pseudo-labels"). Run::

    PYTHONPATH=. .venv/bin/python bench/pseudo_recipes.py 12000 0.1 agrawal,sea [variant,...]
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq

from stream_learner.learn.learner import OnlineLearner

VARIANTS: dict[str, dict[str, Any]] = {
    "off": dict(pseudo_enabled=False),
    "on": dict(),
    "add": dict(pseudo_mix="add"),
    "add+susp": dict(pseudo_mix="add", pseudo_suspend_batches=100),
    "teach+add": dict(pseudo_mix="add", pseudo_teacher_decay=0.99),
    "teach+add+susp": dict(pseudo_mix="add", pseudo_teacher_decay=0.99, pseudo_suspend_batches=100),
    "teach+share": dict(pseudo_teacher_decay=0.99),
    "add w1": dict(pseudo_mix="add", pseudo_weight=1.0),
}


def main() -> None:
    """Every variant on every stream; accuracy against the true label of every example."""
    torch.set_num_threads(1)
    n, frac, streams = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(",")
    sel = sys.argv[4].split(",") if len(sys.argv) > 4 else list(VARIANTS)
    orig_build = bq.build_ours
    for name in streams:
        s = bq.make_stream(name, n, n // 2, bq.SEED)
        rng = random.Random(bq.SEED + 17)
        unl = [rng.random() >= frac for _ in s.xs]
        ev = bq.to_events(s, unl)
        lab = ~np.array(unl)
        base = None
        for v in sel:

            def build(stream: Any, o: Any, v: str = v) -> Any:
                learner, policy, batch, config = orig_build(stream, o)
                config = dataclasses.replace(config, **VARIANTS[v])
                return OnlineLearner(config, drift=learner.drift), policy, batch, config

            bq.build_ours = build
            r = bq.finish(s, [bq.run_ours(s, ev, bq.default("mlp"))], lab, keep=True)
            ad = bq.after_drift(r.pop("_correct"), s.abrupt, min(5000, n // 4))
            acc = r["accuracy_hidden_truth"]
            base = acc if base is None else base
            print(
                f"{name:10} {v:15} all {acc:.4f} ({100 * (acc - base):+.2f}) lab {r['accuracy']:.4f} "
                f"after {' '.join(f'{a:.3f}' for a in ad)} pseudo {r['counts']['pseudo']} "
                f"{r['examples_per_s']:.0f}/s",
                flush=True,
            )
        bq.build_ours = orig_build


if __name__ == "__main__":
    main()
