"""The spike guard at few labels (issue 14): refusals and accuracy, guard on and off, pseudo-labels on and off.

Our default MLP (drift detection on) on bench_quality's streams with only a
fraction of the labels. Reports, per run, the batches the guard refused, those
outside [drift - width, drift + 5000), and the accuracy on the labeled examples
and on every example against its true label. To compare with the guard before
issue 14, point PYTHONPATH at a checkout of a3631df (this script and
bench_quality.py come from the tree they are run from)::

    PYTHONPATH=. .venv/bin/python bench/guard_refusals.py [--examples N] [--labels F] [--streams a,b]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq


def main() -> None:
    """Every stream, guard on (the default factor) and off, pseudo-labels on and off."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--labels", type=float, default=0.1)
    ap.add_argument("--streams", default="agrawal,sea,shuttle")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.streams.split(","):
        s = bq.make_stream(name, args.examples, args.examples // 2, bq.SEED)
        rng = random.Random(bq.SEED + 17)
        unlabeled = [rng.random() >= args.labels for _ in s.xs]
        events = bq.to_events(s, unlabeled)
        labeled = ~np.array(unlabeled)
        for pseudo in (True, False):
            for guard in (True, False):
                changes: dict[str, object] = {"pseudo": pseudo}
                if not guard:
                    changes["spike_factor"] = 1e9
                r = bq.finish(s, [bq.run_ours(s, events, bq.default("mlp", **changes))], labeled)
                width = max(args.examples // 200, 1)
                at = s.abrupt
                quiet = [i for i in r["rollback_at"] if not any(d - width <= i < d + 5000 for d in at)]
                c = r["counts"]
                judged = c["batches"] + c["rollbacks"]
                print(
                    f"{name:8} pseudo={'on ' if pseudo else 'off'} guard={'on ' if guard else 'off'} "
                    f"acc(labeled) {r['accuracy']:.4f} acc(all) {r['accuracy_hidden_truth']:.4f} "
                    f"refused {c['rollbacks']}/{judged} = {c['rollbacks'] / max(judged, 1):.2%}, "
                    f"outside drifts {len(quiet)} = {len(quiet) / max(judged, 1):.2%}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
