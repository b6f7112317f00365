"""The demo's results: the summary (JSON), a few lines for a person, and the HTML page with its SVG plot.

Served accuracy is scored by the application; the join, the checkpoints and
the drift detections come from the monitor; freshness is, per label, the time
from the application sending it to the node serving a model whose manifest
says it trained on that label's example.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ...sdk import SDKStats
from .app import DemoConfig, Served
from .monitor import Observed


def rolling(correct: Sequence[bool], window: int) -> list[float]:
    """Accuracy over the last ``window`` requests at each request (fewer at the start).

    >>> rolling([True, False, True, True], 2)
    [1.0, 0.5, 0.5, 1.0]
    """
    out, total = [], 0
    for i, c in enumerate(correct):
        total += c
        if i >= window:
            total -= correct[i - window]
        out.append(total / min(i + 1, window))
    return out


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``.

    >>> quantile([3.0, 1.0, 2.0, 4.0], 0.5), quantile([], 0.5)
    (2.0, None)
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(config: DemoConfig, served: list[Served | None], failures: Counter[str], seen: Observed,
              label_sent_at: dict[str, float], model_info: dict[str, Any], t0: float, drift_wall: float | None,
              sdk_stats: SDKStats) -> dict[str, Any]:
    """The summary of a run, as ``summary.json`` has it."""
    answered = [(i, s) for i, s in enumerate(served) if s is not None]
    k = config.drift_index
    window = 500
    before = [s.correct for i, s in answered if k - 3000 <= i < k]
    after_all = [s for i, s in answered if i >= k]
    rolling_after = rolling([s.correct for s in after_all], window)
    pre_acc = sum(before) / len(before) if before else float("nan")
    worst = min(rolling_after[window:], default=float("nan"))
    recovered_at = next((n for n, a in enumerate(rolling_after) if n >= window and a >= 0.95 * pre_acc), None)
    final = [s.correct for s in after_all[-3000:]]
    drifts = [d for d in seen.drift if d.kind == "drift"]
    detected = next((d for d in drifts if drift_wall is not None and d.event_time / 1000 >= drift_wall), None)
    # Freshness: label sent -> the node serves a version that trained on its example.
    swaps = sorted((s["at"], s["version"]) for s in model_info.get("swaps", []))
    covers = sorted(seen.manifests.items())
    fresh = []
    for event_id, sent in label_sent_at.items():
        where = seen.example_at.get(event_id)
        if where is None:
            continue
        p, o = where
        version = next((v for v, m in covers if any(src.partition == p and src.offset > o
                                                   for src in m.input_offsets)), None)
        if version is None:
            continue
        at = next((t for t, v in swaps if v >= version and t >= sent), None)
        if at is not None:
            fresh.append(at - sent)
    total = len(served)
    return {
        "requests": {"sent": total, "answered": len(answered), "failed": dict(failures)},
        "labels": {"sent": len(label_sent_at), "never_sent": total - len(label_sent_at),
                   "sdk_failed": sdk_stats.failed, "sdk_dropped": sdk_stats.dropped},
        "examples": {**{kind: seen.examples[kind] for kind in ("labeled", "unlabeled", "late")},
                     "duplicates": seen.duplicates},
        "join_rates": {kind: round(seen.examples[kind] / total, 4) for kind in ("labeled", "unlabeled", "late")},
        "served_accuracy": {
            "before_drift": round(pre_acc, 4),
            "worst_after_drift": round(worst, 4),
            "final": round(sum(final) / len(final), 4) if final else None,
            "recovered_to_95pct_after_requests": recovered_at,
            "rolling_window": window,
        },
        "drift": {
            "at_request": k,
            "at_s": round(drift_wall - t0, 2) if drift_wall else None,
            "detected_at_s": round(detected.event_time / 1000 - t0, 2) if detected else None,
            "detected_after_s": round(detected.event_time / 1000 - drift_wall, 2) if detected and drift_wall else None,
            "detector": detected.detector if detected else None,
            "drift_events": len(drifts),
            "warnings": sum(d.kind == "warning" for d in seen.drift),
        },
        "checkpoints": {"published": len(seen.manifests), "newest": max(seen.manifests, default=None),
                        "swaps_at_node": len(swaps),
                        "node_failures": model_info.get("status", {}).get("failures")},
        "freshness_s": {"labels": len(fresh), "p50": _round(quantile(fresh, 0.5)),
                        "p99": _round(quantile(fresh, 0.99))},
        "report": str(config.out / "report.html"),
    }


def describe(summary: dict[str, Any]) -> str:
    """The summary in a few lines for a person (the JSON has everything)."""
    r, acc, d, c, f = (summary[k] for k in ("requests", "served_accuracy", "drift", "checkpoints", "freshness_s"))
    ex = summary["examples"]
    detected = (f"detected {d['detected_after_s']} s later by {d['detector']}" if d["detected_after_s"] is not None
                else "not detected")
    return "\n".join([
        f"requests   {r['answered']:,} answered of {r['sent']:,}, failed: {r['failed'] or 'none'}",
        (f"examples   {ex['labeled']:,} labeled, {ex['unlabeled']:,} unlabeled, {ex['late']:,} late"
         f" (all accounted for: {'yes' if summary['complete'] else 'NO'})"),
        (f"served acc before the drift {acc['before_drift']}, worst after {acc['worst_after_drift']},"
         f" final {acc['final']}; back to 95% after {acc['recovered_to_95pct_after_requests']} requests"),
        f"drift      at {d['at_s']} s (request {d['at_request']:,}), {detected}",
        f"models     {c['published']} checkpoints published, {c['swaps_at_node']} swapped in by the node",
        f"freshness  label sent -> node serves a model trained on it: p50 {f['p50']} s, p99 {f['p99']} s",
        f"report     {summary['report']}",
    ])


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def report_html(config: DemoConfig, served: list[Served | None], t0: float, drift_wall: float | None,
                summary: dict[str, Any]) -> str:
    """A self-contained HTML page: the summary and an SVG plot of served accuracy over time.

    The plot is also written alone to ``served_accuracy.svg`` in ``config.out``.
    """
    points = [s for s in served if s is not None]
    points.sort(key=lambda s: s.sent_at)
    acc = rolling([s.correct for s in points], 300)
    w, h, left, bottom, top = 960, 420, 50, 40, 20
    t_max = max((s.sent_at for s in points), default=1.0) or 1.0

    def x(t: float) -> float:
        return left + (w - left - 10) * t / t_max

    def y(a: float) -> float:
        return top + (h - top - bottom) * (1 - a)

    step = max(1, len(points) // 800)
    line = " ".join(f"{x(s.sent_at):.1f},{y(a):.1f}" for s, a in list(zip(points, acc, strict=True))[::step])
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
              f'font-size="11">'),
             (f'<rect x="{left}" y="{top}" width="{w - left - 10}" height="{h - top - bottom}" fill="#fafafa" '
              f'stroke="#ccc"/>')]
    for a in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        parts.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{a:.1f}</text>')
    for t in range(0, int(t_max) + 1, 10):
        parts.append(f'<text x="{x(t):.1f}" y="{h - bottom + 14}" text-anchor="middle">{t}s</text>')
    # Model versions: a tick where the served version changed.
    last = None
    for s in points:
        if s.version != last:
            parts.append(f'<line x1="{x(s.sent_at):.1f}" x2="{x(s.sent_at):.1f}" y1="{h - bottom}" '
                         f'y2="{h - bottom - 8}" stroke="#4a7"><title>v{s.version}</title></line>')
            last = s.version
    marks: list[tuple[float, str, str]] = []
    if drift_wall is not None:
        marks.append((drift_wall - t0, "#c33", "drift"))
    if summary["drift"]["detected_at_s"] is not None:
        marks.append((summary["drift"]["detected_at_s"], "#e90", "detected"))
    for at, color, label in marks:
        parts.append(f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{top}" y2="{h - bottom}" stroke="{color}" '
                     f'stroke-dasharray="5,3"/><text x="{x(at) + 4:.1f}" y="{top + 12}" fill="{color}">{label}</text>')
    parts.append(f'<polyline fill="none" stroke="#247" stroke-width="1.5" points="{line}"/>')
    parts.append(f'<text x="{left}" y="{h - 6}">served accuracy (last 300 requests) over time; green ticks: '
                 f'model version swaps at the serving node</text></svg>')
    svg = "\n".join(parts)
    (config.out / "served_accuracy.svg").write_text(svg)
    return ("<!doctype html><meta charset='utf-8'><title>stream-learner demo</title>"
            "<h1>stream-learner demo</h1>" + svg +
            "<h2>Summary</h2><pre>" + json.dumps(summary, indent=2) + "</pre>")
