"""``stream-learner replay``: arguments, the run, the report.

The same command run again resumes the same replay: the default replay id
is a digest of the arguments that define it (source, bounds, lineage,
output, window closing), and the resolved ranges are recorded at the first
run, so ``--to end`` keeps meaning the end as it was then. A finished replay
run again only prints its summary and report. Give ``--replay-id`` to run
the same range again as a new replay.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..checkpoint.signing import load_private_key
from ..config import Settings
from .plan import ReplayPlan
from .report import compare, live_manifests, to_markdown
from .runner import Replay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The replay sub-command's own arguments (settings come as flags too)."""
    parser.add_argument(
        "--source",
        choices=["events", "examples"],
        default="events",
        help="events: predictions + labels through the join, then training (default); "
        "examples: training alone, on the examples topic",
    )
    parser.add_argument(
        "--from",
        dest="range_from",
        default="beginning",
        metavar="BOUND",
        help="start (inclusive): beginning, an offset, P=O,... or TOPIC:P=O,..., "
        "t:<ms> or an ISO-8601 time (record timestamps)",
    )
    parser.add_argument(
        "--to",
        dest="range_to",
        default="end",
        metavar="BOUND",
        help="end (exclusive), same forms; end = the end offsets when the replay starts",
    )
    parser.add_argument(
        "--replay-id", default=None, help="names the replay's state and lineage (default: a digest of these arguments)"
    )
    parser.add_argument(
        "--lineage", default=None, help="model name to publish under (default <trainer_model>@replay-<id>)"
    )
    parser.add_argument(
        "--output-dir", default=None, help="write checkpoints here (<dir>/<lineage>/vN.*) instead of the model topic"
    )
    parser.add_argument(
        "--overwrite-live",
        action="store_true",
        help="allow --lineage to be the live model (new versions after its newest)",
    )
    parser.add_argument(
        "--close-windows",
        action="store_true",
        help="at the end, close the join windows still open (unlabeled examples)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def plan_from_args(args: argparse.Namespace) -> ReplayPlan:
    """The replay plan the arguments describe (the default id is a digest of them)."""
    defining = [args.source, args.range_from, args.range_to, args.lineage, args.output_dir, args.close_windows]
    replay_id = args.replay_id or hashlib.sha256(json.dumps(defining).encode()).hexdigest()[:12]
    return ReplayPlan(
        replay_id=replay_id,
        source=args.source,
        start=args.range_from,
        end=args.range_to,
        lineage=args.lineage,
        output_dir=args.output_dir,
        overwrite_live=args.overwrite_live,
        close_windows=args.close_windows,
    )


def report_for(settings: Settings, summary: dict[str, Any]) -> dict[str, Any]:
    """Compare a finished replay with the live lineage on the model topic; written beside its state."""
    public = load_private_key(settings.trainer_signing_key).public_key()  # type: ignore[arg-type]
    report = compare(summary, live_manifests(settings, settings.trainer_model, public), settings.topic_examples)
    out = Path(settings.replay_state_dir) / summary["replay_id"]
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.md").write_text(to_markdown(report))
    return report


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run (or resume) the replay; print the report. Exit 0 when done, 130 when interrupted (resumable)."""
    plan = plan_from_args(args)
    stop = threading.Event()

    def interrupt(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now; the last snapshot still resumes
        print("\nstopping at the next step; run the same command to resume", file=sys.stderr)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    summary = Replay(settings, plan, stop=stop, progress=not args.no_progress).run()
    if not summary["done"]:
        print(
            json.dumps(
                {
                    "replay_id": plan.replay_id,
                    "done": False,
                    "records_read": summary["records_read"],
                    "of": summary["records_in_ranges"],
                }
            )
        )
        return 130
    print(to_markdown(report_for(settings, summary)))
    print(f"state, summary and report: {Path(settings.replay_state_dir) / plan.replay_id}")
    return 0
