"""The main job, shortened: the whole loop on real local servers, checked from the outside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_serves_learns_detects_the_drift_and_accounts_for_every_event(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "stream_learner.cli", "demo", "--seconds", "20", "--rate", "300",
                          "--quiet", "--out", str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    requests, labels, examples = summary["requests"], summary["labels"], summary["examples"]
    # Every request answered; every prediction and every label accounted for by the joiner.
    assert requests["sent"] == requests["answered"] == 6000 and requests["failed"] == {}
    assert summary["complete"] is True
    assert examples["labeled"] + examples["unlabeled"] == requests["sent"]
    assert examples["labeled"] + examples["late"] == labels["sent"]
    assert labels["sdk_failed"] == labels["sdk_dropped"] == 0
    assert 0 < labels["sent"] < requests["sent"]  # some labels never come
    assert examples["late"] > 0
    # Checkpoints flowed back and were served; none refused.
    checkpoints = summary["checkpoints"]
    assert checkpoints["published"] >= 5 and checkpoints["swaps_at_node"] >= 5 and checkpoints["node_failures"] == 0
    # The drift hurt, was detected, and the served model recovered.
    acc, drift = summary["served_accuracy"], summary["drift"]
    assert drift["at_request"] == 3000 and drift["detected_after_s"] is not None and drift["detected_after_s"] < 10
    assert acc["worst_after_drift"] < acc["final"]
    fresh = summary["freshness_s"]
    assert fresh["labels"] > 0.9 * labels["sent"] and 0 < fresh["p50"] <= fresh["p99"]
    report = (tmp_path / "report.html").read_text()
    assert "<svg" in report and ">drift<" in report and ">detected<" in report and "<title>v1</title>" in report
