"""Instructions per example: the trainer and replay at an old commit and at the working tree, under callgrind.

Wall and CPU time on a shared 2-core machine move by 10-30 % with the
neighbours, which hides a 5 % change. The number of instructions a process
executes for the same work does not depend on them. This benchmark starts
local servers, produces one examples topic (16 float features, binary
classes, 20 % unlabeled), then for each side runs, under ``valgrind
--tool=callgrind``:

* ``trainer``: the real trainer (``build_trainer(settings)``, or
  ``Trainer(settings)`` where a commit has no builder), stepped in a driver
  process until ``--warmup`` examples are applied, then counting on
  (``callgrind_control -i on``) for the next ``--examples`` examples, then
  off. Instructions counted / examples applied while on = the per-example
  cost of consume + decode + learn + drift + checkpoints (every 4,000
  examples), start-up excluded.
* ``replay``: ``stream-learner replay --source examples`` over the first
  ``--warmup`` examples and over the first ``--warmup + --examples``, each a
  whole process; the difference of the two totals / ``--examples``.

Each side imports its own ``stream_learner`` (``PYTHONPATH`` set to a
temporary git worktree of the old commit, or to this tree). The table gives
instructions per example and the ratio new/old (1.05 = 5 % more work per
example). Needs ``valgrind`` (``apt-get install valgrind``). About 10 minutes.

Usage::

    .venv/bin/python bench/instructions.py --old 5c4df92 [--new REV] [--examples 8000] [--warmup 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ab import short_commit, worktree  # bench/ is this script's directory, first on sys.path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "instructions.json"
FEATURES = [f"f{i}" for i in range(16)]
COLLECTED = re.compile(r"Collected : (\d+)")


def _produce(settings: Any, topic: str, n: int) -> None:
    from stream_learner.bus import make_producer
    from stream_learner.events import ExampleEvent, encode

    rng = random.Random(3)
    producer = make_producer(settings)
    for i in range(n):
        x = {f: rng.gauss(0, 1) for f in FEATURES}
        kind = "unlabeled" if rng.random() < 0.2 else "labeled"
        label = None if kind == "unlabeled" else ("1" if sum(x.values()) > 0 else "0")
        ex = ExampleEvent(
            example_id=f"e{i}",
            kind=kind,
            request_id=f"r{i}",
            model="m",
            model_version="1",
            features=x,
            prediction={"0": 0.5, "1": 0.5},
            label=label,
            prediction_event_id=f"p{i}",
            prediction_time=i,
        )
        producer.send(topic, key=ex.request_id.encode(), value=encode(ex))
    producer.flush()
    producer.close()


def _drive_trainer(warmup: int, examples: int, out: Path) -> None:
    """Runs inside valgrind with the side's PYTHONPATH: step a trainer, counting only the measured span."""
    from stream_learner.config import load_settings

    try:
        from stream_learner.learn.trainer import build_trainer as make
    except ImportError:  # commits before the one way to build a trainer
        from stream_learner.learn.trainer import Trainer as make
    settings = load_settings()  # from the STREAM_LEARNER_* environment the parent set
    trainer = make(settings)

    def applied() -> int:
        return int(sum(trainer.offsets.values()))

    def toggle(on: bool) -> None:
        subprocess.run(
            ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True, capture_output=True
        )

    while applied() < warmup:
        trainer.step()
    start = applied()
    toggle(True)
    while applied() < start + examples:
        trainer.step()
    toggle(False)
    out.write_text(json.dumps({"applied": applied() - start}))  # stdout carries the trainer's logs
    trainer.close()


def _callgrind(
    cmd: list[str], env: dict[str, str], cwd: Path, *, at_start: bool, profile: Path | None = None
) -> tuple[int, str]:
    full = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={profile or '/dev/null'}",
        # Off: the process runs uninstrumented (and uncounted) until ``callgrind_control -i on``.
        f"--instr-atstart={'yes' if at_start else 'no'}",
        *cmd,
    ]
    p = subprocess.run(full, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    found = COLLECTED.findall(p.stderr)
    if p.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return int(found[-1]), p.stdout


def main(argv: list[str] | None = None) -> int:
    """Measure instructions per example of the trainer and of replay on both sides and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=None, help="a commit (default: the working tree)")
    ap.add_argument("--examples", type=int, default=8000, help="examples counted per side")
    ap.add_argument("--warmup", type=int, default=2000, help="examples applied before counting")
    ap.add_argument("--what", default="trainer,replay")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--profiles", type=Path, default=None, help="keep the trainer runs' callgrind files here (callgrind_annotate)"
    )
    ap.add_argument("--drive-trainer", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.drive_trainer:
        warmup, examples, out = args.drive_trainer
        _drive_trainer(int(warmup), int(examples), Path(out))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    import msgspec

    from stream_learner.bus import ensure_topics
    from stream_learner.checkpoint.signing import generate_keypair
    from stream_learner.config import Settings, settings_env
    from stream_learner.local import LocalServers

    whats = [w for w in args.what.split(",") if w]
    total = args.warmup + args.examples
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as tmp, LocalServers(Settings()) as srv:
        work = Path(tmp)
        private_pem, _ = generate_keypair()
        key = work / "signing.pem"
        key.write_bytes(private_pem)
        key.chmod(0o600)
        topic = "instr.examples"
        base = msgspec.structs.replace(
            srv.settings,
            topic_examples=topic,
            trainer_model="m",
            trainer_features=FEATURES,
            trainer_classes=["0", "1"],
            trainer_signing_key=str(key),
            trainer_checkpoint_every_s=1e9,
            trainer_checkpoint_every_examples=4000,
            consumer_fetch_max_wait_ms=50,
        )
        ensure_topics(base)
        # A margin past what the trainer counts: it cuts a partial chunk only when caught up.
        _produce(base, topic, total + 2000)
        made: list[Path] = []
        try:
            sides = {"old": worktree(args.old, work)}
            made.append(sides["old"])
            if args.new:
                sides["new"] = worktree(args.new, work)
                made.append(sides["new"])
            else:
                sides["new"] = REPO
            commits = {
                k: short_commit(v) + ("" if k == "old" or args.new else " (working tree)") for k, v in sides.items()
            }
            for side, tree in sides.items():
                for what in whats:
                    tag = f"{side}-{what}-{int(time.time() * 1000)}"
                    s = msgspec.structs.replace(
                        base,
                        topic_models=f"instr.models.{tag}",
                        topic_drift=f"instr.drift.{tag}",
                        topic_dlq=f"instr.dlq.{tag}",
                        trainer_group_id=f"instr-{tag}",
                        trainer_state_dir=str(work / tag / "state"),
                        replay_state_dir=str(work / tag / "replay"),
                    )
                    ensure_topics(s)
                    env = {**settings_env(s), "PYTHONPATH": str(tree)}
                    t0 = time.perf_counter()
                    if what == "trainer":
                        cmd = [sys.executable, str(Path(__file__).resolve()), "--old", "-", "--drive-trainer"]
                        done = work / tag / "applied.json"
                        done.parent.mkdir(parents=True, exist_ok=True)
                        drive = [*cmd, str(args.warmup), str(args.examples), str(done)]
                        profile = args.profiles / f"callgrind.{side}-trainer" if args.profiles else None
                        count, _ = _callgrind(drive, env, tree, at_start=False, profile=profile)
                        applied = json.loads(done.read_text())["applied"]
                        per = count / applied
                        rows.setdefault(what, {})[side] = {
                            "instructions": count,
                            "examples": applied,
                            "per_example": per,
                        }
                    else:
                        counts = []
                        for n, rid in ((args.warmup, "a"), (total, "b")):
                            cli = "import sys; from stream_learner.cli import main; sys.exit(main())"
                            replay = [sys.executable, "-c", cli, "replay", "--source", "examples", "--from"]
                            replay += ["beginning", "--to", f"0={n}", "--replay-id", f"{tag}-{rid}"]
                            replay += ["--output-dir", str(work / tag / f"out-{rid}"), "--no-progress"]
                            counts.append(_callgrind(replay, env, tree, at_start=True)[0])
                        per = (counts[1] - counts[0]) / args.examples
                        rows.setdefault(what, {})[side] = {
                            "instructions": counts,
                            "examples": args.examples,
                            "per_example": per,
                        }
                    print(
                        f"{side} {what}: {per:,.0f} instructions/example ({time.perf_counter() - t0:.0f} s)", flush=True
                    )
        finally:
            for path in made:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)

    print(f"\ninstructions per example: old {commits['old']} vs new {commits['new']}")
    print(f"{'':<10} {'old':>12} {'new':>12} {'new/old':>8}")
    for what, r in rows.items():
        r["new_over_old"] = r["new"]["per_example"] / r["old"]["per_example"]
        print(
            f"{what:<10} {r['old']['per_example']:>12,.0f} {r['new']['per_example']:>12,.0f} {r['new_over_old']:>8.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"commits": commits, "args": vars(args), "rows": rows}, indent=1, default=str) + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
