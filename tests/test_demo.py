"""The main job, shortened: the whole loop on real local servers, checked from the outside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_serves_learns_detects_the_drift_and_accounts_for_every_event(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_learner.cli",
            "demo",
            "--seconds",
            "20",
            "--rate",
            "300",
            "--quiet",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
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
    # Without learning (the version serving at the drift, kept), users would have been served worse after it.
    static = summary["static_baseline"]
    assert static is not None and static["version"] >= 1 and static["from_request"] < drift["at_request"]
    assert static["after_drift"] < acc["after_drift"] and static["final"] < acc["final"]
    assert f"without learning: v{static['version']}" in report
    # One rolling window for the plot and the summary; latency next to accuracy.
    assert f"last {acc['rolling_window']} requests" in report
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] and "Latency per second" in report


def _synthetic_run(tmp_path: Path):
    """A run of 4000 requests whose answers are right 90% of the time, 50% for 1000 requests after the drift."""
    import random

    from stream_learner.tools.demo import DemoConfig
    from stream_learner.tools.demo.app import Served
    from stream_learner.tools.demo.baseline import Baseline

    config = DemoConfig(rate=100, seconds=40, out=tmp_path, rolling_window=200)
    rng = random.Random(1)
    k = config.drift_index
    served: list[Served | None] = []
    for i in range(config.requests):
        p = 0.5 if k <= i < k + 1000 else 0.9
        served.append(Served(i / config.rate, 1 + i // 400, rng.random() < p, 0.002 + 0.01 * rng.random()))
    served[7] = None  # one request never answered
    # Without learning, the model of request k - 1 stays at 50% after the drift.
    baseline = Baseline(
        version=served[k - 1].version,
        first=(k - 1) // 400 * 400,
        correct=[None if s is None else (s.correct if i < k else rng.random() < 0.5) for i, s in enumerate(served)],
    )
    return config, served, baseline


def test_the_report_has_the_baseline_a_legend_latency_and_one_rolling_window(tmp_path: Path) -> None:
    import re
    from collections import Counter

    from stream_learner.sdk import SDKStats
    from stream_learner.tools.demo.monitor import Observed
    from stream_learner.tools.demo.report import Curves, label_rows, report_html, summarize

    config, served, baseline = _synthetic_run(tmp_path)
    summary = summarize(config, served, Counter(), Observed(), {}, {}, 0.0, 20.0, SDKStats(0, 0, 0, 0), baseline)
    summary["complete"] = True
    acc, static = summary["served_accuracy"], summary["static_baseline"]
    # The summary's worst point is the plotted curve's, over full windows after the drift, in one window size.
    curves = Curves.of(served, config.rolling_window, baseline)
    after = curves.full_after(config.drift_index)
    assert acc["rolling_window"] == curves.window == 200
    assert acc["worst_after_drift"] == round(min(curves.live[n] for n in after), 4)
    assert static["worst_after_drift"] == round(min(curves.static[n] for n in after), 4)
    assert static["version"] == baseline.version and static["after_drift"] < acc["after_drift"]
    assert acc["recovered_to_95pct_after_requests"] > 1000  # the bad stretch is 1000 requests long
    assert summary["latency_ms"]["p50"] < summary["latency_ms"]["p99"] <= 12.0
    html = report_html(
        config, served, 0.0, 20.0, {**summary, "drift": {**summary["drift"], "detected_at_s": 20.3}}, baseline
    )
    svg = (tmp_path / "served_accuracy.svg").read_text()
    assert svg in html
    assert "last 200 requests" in svg  # the same window as the summary
    assert svg.count("<polyline") == 4  # served, without learning, latency p50 and p99
    for entry in (
        "served (learning live)",
        f"without learning: v{baseline.version}",
        "latency p50",
        "latency p99",
        "drift (concept changes)",
        "drift detected",
        "model swap at the node",
    ):
        assert entry in svg, entry
    # The two marks 0.3 s apart get their labels on two rows.
    drift_y = re.search(r'<text [^>]*y="([\d.]+)" fill="#c33">drift</text>', svg)
    detected_y = re.search(r'<text [^>]*y="([\d.]+)" fill="#e90">detected</text>', svg)
    assert drift_y and detected_y and drift_y.group(1) != detected_y.group(1)
    assert label_rows([(10.0, "drift"), (20.0, "detected"), (80.0, "later")]) == [0, 1, 0]
