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
    # Serving variants: every version gated; each decision counted once, published or skipped with a reason.
    variants = summary["variants"]
    assert list(variants) == ["int8", "sparse", "student"]  # the demo's default, in its order
    for v in variants.values():
        assert 0 < v["gated"] <= checkpoints["published"]
        assert v["published"] + sum(v["skipped"].values()) == v["gated"]
        assert set(v["skipped"]) <= {"accuracy", "slower", "too_few_examples", "not_applicable"}
    # The demo's 64-wide MLP has no layer int8 would quantize: never published, a node following it serves fp32.
    int8 = variants["int8"]
    assert int8["published"] == 0 and set(int8["skipped"]) == {"not_applicable"} and int8["served"] is None
    # sparse is gated on accuracy alone (not a speed variant): some versions pass, and a node following it
    # answers part of the traffic with them, the rest with fp32, each request once.
    sparse = variants["sparse"]
    assert sparse["published"] > 0
    served_sparse = sparse["served"]
    assert served_sparse is not None and served_sparse["requests"] == requests["answered"]
    assert 0 < served_sparse["by_variant"] < requests["answered"]
    assert served_sparse["by_variant"] + sum(served_sparse["fallback"].values()) == requests["answered"]
    assert set(served_sparse["fallback"]) <= {"no_variant_yet", "variant_behind"}
    # Next to fp32 on the same requests: within the gate's spirit (a wrong replay, e.g. another model's
    # featurizer or swapped classes, would be tens of points off).
    assert abs(served_sparse["accuracy_variant"] - served_sparse["accuracy_fp32"]) < 0.1
    assert abs(served_sparse["node_accuracy"] - served_sparse["node_accuracy_fp32"]) < 0.05
    assert served_sparse["node_after_drift_fp32"] == acc["after_drift"]  # fp32: what the application was served
    # Its latency is the gate's: as fast as its parent (dense kernels), and the parent is the demo's MLP.
    assert 0 < served_sparse["latency_b1_p50_ms"] and 0.5 < served_sparse["speedup_b1"] < 2
    assert served_sparse["parameters_ratio"] == 1.0
    assert "<h2>Serving variants</h2>" in report and "--serving-variant sparse (replayed)" in report


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
    from stream_learner.tools.demo.curves import Curves
    from stream_learner.tools.demo.monitor import Observed
    from stream_learner.tools.demo.plot import label_rows
    from stream_learner.tools.demo.report import report_html
    from stream_learner.tools.demo.summary import summarize

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


def test_a_node_following_a_variant_is_replayed_by_the_nodes_rule_and_scored_on_the_same_requests(
    tmp_path: Path,
) -> None:
    from collections import Counter
    from types import SimpleNamespace

    from stream_learner.sdk import SDKStats
    from stream_learner.tools.demo.monitor import Observed
    from stream_learner.tools.demo.report import report_html
    from stream_learner.tools.demo.summary import describe, summarize
    from stream_learner.tools.demo.variants import Decision, VariantRun, replay_choice

    config, served, baseline = _synthetic_run(tmp_path)  # parent v(1 + i // 400), request i answered at i / 100 s
    # Variant v1 out at 5 s (request 500, parent v2: one behind, served), v3 at 13 s (request 1300, parent v4).
    choices = replay_choice(served, {1: 5.0, 3: 13.0}, max_lag=1)
    kinds = Counter(None if c is None else (c.variant, c.fallback) for c in choices)
    assert kinds == {
        (None, "no_variant_yet"): 499,  # requests 0-499, less the unanswered one
        None: 1,
        (1, ""): 300,  # 500-799: parent v2
        (None, "variant_behind"): 500 + 400 + 2000,  # 800-1299 (v1 vs v3, v4), 1600-1999 (v3 vs v5), 2000 on
        (3, ""): 300,  # 1300-1599: parent v4
    }
    behind = next(c for c in choices if c is not None and c.fallback == "variant_behind")
    assert behind.why == "the newest variant is of v1, 2 versions behind the parent v3 (serving_variant_max_lag=1)"
    # The variant answers every request it serves wrong: its accuracy is 0, fp32's on those requests is theirs.
    correct = [
        None if s is None else (False if c is not None and c.variant is not None else s.correct)
        for s, c in zip(served, choices, strict=True)
    ]
    measured = {"latency_b1_p50_ms": 0.02, "parent_latency_b1_p50_ms": 0.05, "parameters": 25.0}
    measured |= {"parent_parameters": 100.0, "bytes": 30.0, "parent_bytes": 100.0}
    manifests = {v: SimpleNamespace(variant=SimpleNamespace(measured=measured)) for v in (1, 3)}
    decisions = [Decision("student", 1, True), Decision("student", 2, False, "accuracy", "student: worse")]
    decisions.append(Decision("student", 3, True))
    run = VariantRun("student", decisions, manifests, choices, correct)
    never = VariantRun("int8", [Decision("int8", v, False, "not_applicable", "int8: narrow") for v in (1, 2, 3)], {})
    summary = summarize(
        config, served, Counter(), Observed(), {}, {}, 0.0, 20.0, SDKStats(0, 0, 0, 0), baseline, [run, never]
    )
    summary["complete"] = True
    v = summary["variants"]["student"]
    assert (v["gated"], v["published"], v["skipped"]) == (3, 2, {"accuracy": 1})
    s = v["served"]
    by_variant = [i for i, c in enumerate(choices) if c is not None and c.variant is not None]
    fp32 = round(sum(served[i].correct for i in by_variant) / len(by_variant), 4)
    assert (s["by_variant"], s["accuracy_variant"], s["accuracy_fp32"]) == (600, 0.0, fp32)
    assert s["fallback"] == {"no_variant_yet": 499, "variant_behind": 2900} and s["versions_served"] == 2
    answered = [x for x in served if x is not None]
    assert s["node_accuracy_fp32"] == round(sum(x.correct for x in answered) / len(answered), 4)
    assert s["node_accuracy"] < s["node_accuracy_fp32"]
    assert (s["speedup_b1"], s["parameters_ratio"], s["bytes_ratio"]) == (2.5, 0.25, 0.3)
    assert summary["variants"]["int8"]["served"] is None
    text = describe(summary)
    assert "int8: 0 of 3 versions passed the gate (skipped: not_applicable 3); served: fp32 throughout" in text
    assert "--serving-variant student (replayed): 600 of 3,999 requests by the variant, acc 0.0 vs fp32" in text
    html = report_html(config, served, 0.0, 20.0, summary, baseline, [run, never])
    assert "<h2>Serving variants</h2>" in html and "title='student: worse'" in html
    svg = (tmp_path / "served_accuracy.svg").read_text()
    assert svg.count("<polyline") == 5 and "--serving-variant student (replayed)" in svg  # int8 never served
