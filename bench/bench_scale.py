"""Scale-out benchmark: the data-parallel trainer at 1, 2 and 4 ranks, and joiners on a Valkey cluster.

Two parts, each on freshly started local servers, each with its baseline in
the same run (ratios, not absolute numbers, are what carry between runs on a
shared machine):

* ``scale_trainer`` -- the real ``stream-learner trainer`` over one backlog
  on 4 partitions: examples/s at 1 rank (1 and 2 torch threads), 2 and 4
  ranks (gloo), and each rank's all-reduce milliseconds per step, for the
  default MLP and a wide one at two batch sizes.
* ``scale_joiner`` -- the real joiner, 1 and 2 processes in one group, on one
  Valkey node and on a 3-master cluster, against a raw kafka-python consume
  of the same input.

Each part's docstring says what its numbers can and cannot show on the
2-core development machine. ``--from-results`` prints the stored results
instead of running (``bench/results/scale_trainer.json``,
``bench/results/scale_joiner.json``).

Run::

    .venv/bin/python bench/bench_scale.py [--only trainer|joiner] [--repeats R] [--from-results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_joiner
import scale_trainer


def main(argv: list[str] | None = None) -> int:
    """Run (or, with ``--from-results``, reload) both parts, print their tables, store their results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("trainer", "joiner"), help="run one part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--from-results", action="store_true", help="print the stored results, run nothing")
    args = ap.parse_args(argv)
    parts = [
        (
            "trainer",
            scale_trainer.RESULTS,
            lambda: scale_trainer.trainer_scale(
                scale_trainer.DEFAULT_EXAMPLES, scale_trainer.DEFAULT_WIDE, args.repeats
            ),
            scale_trainer.print_report,
        ),
        (
            "joiner",
            scale_joiner.RESULTS,
            lambda: scale_joiner.joiner_scale(scale_joiner.DEFAULT_EVENTS, args.repeats),
            scale_joiner.print_report,
        ),
    ]
    for name, path, run, report in parts:
        if args.only not in (None, name):
            continue
        if args.from_results:
            result = json.loads(path.read_text())
        else:
            result = run()
            path.write_text(json.dumps(result, indent=2) + "\n")
        report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
