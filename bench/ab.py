"""A/B: one benchmark run at an old commit and at the working tree, interleaved, with ratios.

A shared machine moves absolute rates by 10-20 % between runs, so "no more
than 5 % slower than commit X" can only be told from runs made side by side.
This script checks the old commit out into a temporary git worktree, then runs
the benchmark alternately from each tree (old, new, new, old, ...: the order
swaps every round, so a machine that gets busier over the run does not favour
one side), each with ``PYTHONPATH`` set to its own tree so that it imports its
own ``stream_learner``. Each side runs *its own* version of the benchmark
script, which measures its own code the way that commit measured it. The
headline numbers of every run are read from the JSON the benchmark writes;
the table gives each side's median over the rounds and the ratio new/old.
Rates there are ratios to the raw-consume baseline of the same run where the
benchmark has one (throughput normalised by what the machine gave the
consumer at that moment), and accuracies, which must be equal.

Usage::

    .venv/bin/python bench/ab.py --old 5c4df92 --bench trainer --rounds 3 -- --examples 50000 --repeat 1
    .venv/bin/python bench/ab.py --old 5c4df92 --bench replay -- --requests 20000 --repeats 1
    .venv/bin/python bench/ab.py --old 5c4df92 --bench quality --rounds 1 -- --streams agrawal,sea --no-ablation

Arguments after ``--`` go to both sides' benchmark unchanged, so use options
both commits' scripts know; ``--old-args`` and ``--new-args`` go to one side
only (e.g. ``--new-args "--phases main"`` where the new script has phases the
old one ran unasked). ``--new REV`` compares two commits instead of the
working tree. Results go to ``bench/results/ab-<bench>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

Metrics = dict[str, float]


def _trainer(result: dict[str, Any]) -> Metrics:
    out: Metrics = {}
    for name, run in result["summary"]["runs"].items():
        out[f"{name} ratio_to_raw"] = run["ratio_to_raw"]
        out[f"{name} examples_per_s"] = run["trainer_examples_per_s"]
        out[f"{name} cpu_us_per_example (lower is better)"] = run["cpu_main_thread_us_per_example"]
        out[f"{name} in_memory_per_s"] = run["learner_in_memory_per_s"]
        out[f"{name} accuracy"] = run["accuracy"]
    return out


def _replay(result: dict[str, Any]) -> Metrics:
    s = result["summary"]
    out: Metrics = {}
    for key in (
        "ratio_replay_to_raw",
        "ratio_replay_to_live",
        "ratio_examples_replay_to_raw",
        "replay_events.per_s",
        "replay_examples.per_s",
    ):
        if key in s:
            out[key] = s[key]["mean"]
    return out


def _quality(result: dict[str, Any]) -> Metrics:
    out: Metrics = {}
    for stream in result.get("main", []):
        for run in stream["runs"]:
            if run.get("family") == "ours":
                out[f"{stream['stream']} {run['model']} accuracy"] = run["accuracy"]
                out[f"{stream['stream']} {run['model']} examples_per_s"] = run["examples_per_s"]
    return out


BENCHES: dict[str, tuple[str, Callable[[dict[str, Any]], Metrics]]] = {
    "trainer": ("bench/bench_trainer.py", _trainer),
    "replay": ("bench/bench_replay.py", _replay),
    "quality": ("bench/bench_quality.py", _quality),
}


def worktree(rev: str, parent: Path) -> Path:
    """Check ``rev`` out, detached, into a new git worktree under ``parent``; its path."""
    path = parent / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True)
    return path


def _sides(old: Path, new: Path, rounds: int) -> Iterator[tuple[int, str, Path]]:
    for r in range(rounds):
        pair = [("old", old), ("new", new)]
        yield from ((r, name, tree) for name, tree in (pair if r % 2 == 0 else pair[::-1]))


def short_commit(tree: Path) -> str:
    """The short hash of what ``tree`` has checked out."""
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark at both commits, interleaved, and print medians and new/old ratios."""
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the commit to compare against")
    ap.add_argument("--new", default=None, help="a commit (default: the working tree)")
    ap.add_argument("--bench", choices=sorted(BENCHES), required=True)
    ap.add_argument("--rounds", type=int, default=2, help="runs per side (default 2)")
    ap.add_argument("--old-args", default="", help="arguments for the old side's script alone (a newer option)")
    ap.add_argument("--new-args", default="", help="arguments for the new side's script alone")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    script, extract = BENCHES[args.bench]
    out_path = args.out or RESULTS / f"ab-{args.bench}.json"

    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        made: list[Path] = []
        try:
            old = worktree(args.old, work)
            made.append(old)
            if args.new:
                new = worktree(args.new, work)
                made.append(new)
            else:
                new = REPO
            commits = {"old": short_commit(old), "new": short_commit(new) + ("" if args.new else " (working tree)")}
            runs: dict[str, list[Metrics]] = {"old": [], "new": []}
            for r, side, tree in _sides(old, new, args.rounds):
                res = work / f"{side}-{r}.json"
                env = {**os.environ, "PYTHONPATH": str(tree)}
                own = shlex.split(args.old_args if side == "old" else args.new_args)
                cmd = [sys.executable, str(tree / script), "--out", str(res), *extra, *own]
                print(f"\n== round {r + 1}/{args.rounds}, {side} ({commits[side]}): {' '.join(cmd)}", flush=True)
                t0 = time.perf_counter()
                subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
                print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
                runs[side].append(extract(json.loads(res.read_text())))
        finally:
            for path in made:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)

    names = [k for k in runs["new"][0] if all(k in m for m in runs["old"] + runs["new"])]
    table = []
    print(f"\n{args.bench}: old {commits['old']} vs new {commits['new']}, {args.rounds} round(s), median per side")
    print(f"{'metric':<60} {'old':>12} {'new':>12} {'new/old':>8}")
    for name in names:
        o = statistics.median(m[name] for m in runs["old"])
        n = statistics.median(m[name] for m in runs["new"])
        ratio = n / o if o else float("nan")
        table.append({"metric": name, "old": o, "new": n, "new_over_old": ratio})
        print(f"{name:<60} {o:>12.4g} {n:>12.4g} {ratio:>8.3f}")
    missing = sorted(set().union(*runs["old"], *runs["new"]) - set(names))
    if missing:
        print("only on one side (not compared): " + ", ".join(missing))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps({"bench": args.bench, "commits": commits, "args": extra, "table": table, "runs": runs}, indent=1)
        + "\n"
    )
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
