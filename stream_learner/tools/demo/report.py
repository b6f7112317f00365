"""The demo's results: the summary (JSON), a few lines for a person, and the HTML page with its SVG plot.

Served accuracy is scored by the application; the join, the checkpoints and
the drift detections come from the monitor; freshness is, per label, the time
from the application sending it to the node serving a model whose manifest
says it trained on that label's example. The static baseline (what users
would have been served without learning) is :mod:`.baseline`'s.

One rolling window (``DemoConfig.rolling_window`` requests, in request order)
makes the accuracy curves: the plot draws them and the summary's worst point
and recovery are read off the same curves (:class:`Curves`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from ...sdk import SDKStats
from .app import DemoConfig, Served
from .baseline import Baseline
from .monitor import Observed
from .variants import VariantRun, summarize_variants


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


@dataclass(frozen=True)
class Curves:
    """The rolling accuracy of what was served, and of the static baseline, per answered request.

    ``index`` holds the answered requests in request order; ``live[n]`` and
    ``static[n]`` are the accuracies over the ``window`` answered requests
    ending at ``index[n]`` (``static`` is ``None`` without a baseline; before
    its first request it equals ``live``: both worlds served the same).
    """

    window: int
    index: list[int]
    live: list[float]
    static: list[float] | None
    variants: dict[str, list[float]] = field(default_factory=dict)  # a node following each, replayed

    @classmethod
    def of(
        cls,
        served: Sequence[Served | None],
        window: int,
        baseline: Baseline | None,
        variants: Sequence[VariantRun] = (),
    ) -> Curves:
        """The curves of a run (``variants``: those a node following them was replayed for)."""
        index = [i for i, s in enumerate(served) if s is not None]
        live = rolling([s.correct for s in served if s is not None], window)
        static = None
        if baseline is not None:
            static = rolling([bool(baseline.correct[i]) for i in index], window)
        replayed = {
            v.name: rolling([bool(v.correct[i]) for i in index], window) for v in variants if v.correct is not None
        }
        return cls(window, index, live, static, replayed)

    def full_after(self, request: int) -> list[int]:
        """Positions whose window holds only requests from ``request`` on."""
        start = next((n for n, i in enumerate(self.index) if i >= request), len(self.index))
        return list(range(start + self.window - 1, len(self.index)))


def _drop(curve: list[float], positions: list[int]) -> float:
    return min((curve[n] for n in positions), default=float("nan"))


def _mean(values: Sequence[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize(
    config: DemoConfig,
    served: list[Served | None],
    failures: Counter[str],
    seen: Observed,
    label_sent_at: dict[str, float],
    model_info: dict[str, Any],
    t0: float,
    drift_wall: float | None,
    sdk_stats: SDKStats,
    baseline: Baseline | None = None,
    variants: Sequence[VariantRun] = (),
) -> dict[str, Any]:
    """The summary of a run, as ``summary.json`` has it."""
    answered = [(i, s) for i, s in enumerate(served) if s is not None]
    k = config.drift_index
    curves = Curves.of(served, config.rolling_window, baseline)
    after = curves.full_after(k)
    before = [s.correct for i, s in answered if k - 3000 <= i < k]
    pre_acc = sum(before) / len(before) if before else float("nan")
    worst = _drop(curves.live, after)
    recovered = next((n for n in after if curves.live[n] >= 0.95 * pre_acc), None)
    after_all = [s for i, s in answered if i >= k]
    final = [s.correct for s in after_all[-3000:]]
    static: dict[str, Any] | None = None
    if baseline is not None and curves.static is not None:
        kept = [(i, bool(baseline.correct[i])) for i, _ in answered]
        static = {
            "version": baseline.version,
            "from_request": baseline.first,
            "after_drift": _mean([c for i, c in kept if i >= k]),
            "worst_after_drift": round(_drop(curves.static, after), 4),
            "final": _mean([c for _, c in kept if _ >= k][-3000:]),
        }
    latencies = [s.latency_s * 1000 for _, s in answered]
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
        version = next(
            (v for v, m in covers if any(src.partition == p and src.offset > o for src in m.input_offsets)), None
        )
        if version is None:
            continue
        at = next((t for t, v in swaps if v >= version and t >= sent), None)
        if at is not None:
            fresh.append(at - sent)
    total = len(served)
    return {
        "requests": {"sent": total, "answered": len(answered), "failed": dict(failures)},
        "labels": {
            "sent": len(label_sent_at),
            "never_sent": total - len(label_sent_at),
            "sdk_failed": sdk_stats.failed,
            "sdk_dropped": sdk_stats.dropped,
        },
        "examples": {
            **{kind: seen.examples[kind] for kind in ("labeled", "unlabeled", "late")},
            "duplicates": seen.duplicates,
        },
        "join_rates": {kind: round(seen.examples[kind] / total, 4) for kind in ("labeled", "unlabeled", "late")},
        "served_accuracy": {
            "before_drift": round(pre_acc, 4),
            "after_drift": _mean([s.correct for s in after_all]),
            "worst_after_drift": round(worst, 4),
            "final": _mean(final),
            "recovered_to_95pct_after_requests": None if recovered is None else curves.index[recovered] - k,
            "rolling_window": curves.window,
        },
        "static_baseline": static,
        "latency_ms": {
            "p50": _round(quantile(latencies, 0.5)),
            "p99": _round(quantile(latencies, 0.99)),
            "max": _round(max(latencies, default=None)),
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
        "checkpoints": {
            "published": len(seen.manifests),
            "newest": max(seen.manifests, default=None),
            "swaps_at_node": len(swaps),
            "node_failures": model_info.get("status", {}).get("failures"),
        },
        "freshness_s": {
            "labels": len(fresh),
            "p50": _round(quantile(fresh, 0.5)),
            "p99": _round(quantile(fresh, 0.99)),
        },
        "variants": summarize_variants(variants, served, k),
        "report": str(config.out / "report.html"),
    }


def describe(summary: dict[str, Any]) -> str:
    """The summary in a few lines for a person (the JSON has everything)."""
    r, acc, d, c, f = (summary[k] for k in ("requests", "served_accuracy", "drift", "checkpoints", "freshness_s"))
    ex, lat, static = summary["examples"], summary["latency_ms"], summary["static_baseline"]
    detected = (
        f"detected {d['detected_after_s']} s later by {d['detector']}"
        if d["detected_after_s"] is not None
        else "not detected"
    )
    lines = [
        f"requests   {r['answered']:,} answered of {r['sent']:,}, failed: {r['failed'] or 'none'}",
        (
            f"examples   {ex['labeled']:,} labeled, {ex['unlabeled']:,} unlabeled, {ex['late']:,} late"
            f" (all accounted for: {'yes' if summary['complete'] else 'NO'})"
        ),
        (
            f"served acc before the drift {acc['before_drift']}, after {acc['after_drift']} (worst"
            f" {acc['worst_after_drift']} over {acc['rolling_window']} requests), final {acc['final']};"
            f" back to 95% after {acc['recovered_to_95pct_after_requests']} requests"
        ),
    ]
    if static is not None:
        lines.append(
            f"no learning v{static['version']} kept from request {static['from_request']:,}: after the drift"
            f" {static['after_drift']} (worst {static['worst_after_drift']}), final {static['final']}"
        )
    lines += [
        f"latency    p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms (request -> answer)",
        f"drift      at {d['at_s']} s (request {d['at_request']:,}), {detected}",
        f"models     {c['published']} checkpoints published, {c['swaps_at_node']} swapped in by the node",
        f"freshness  label sent -> node serves a model trained on it: p50 {f['p50']} s, p99 {f['p99']} s",
        *(variant_line(name, v) for name, v in summary.get("variants", {}).items()),
        f"report     {summary['report']}",
    ]
    return "\n".join(lines)


def variant_line(name: str, v: dict[str, Any]) -> str:
    """One variant of the summary in a line: the gate's decisions, and the replayed node next to fp32.

    >>> variant_line("int8", {"gated": 3, "published": 0, "skipped": {"not_applicable": 3}, "served": None})
    'variant    int8: 0 of 3 versions passed the gate (skipped: not_applicable 3); served: fp32 throughout'
    """
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(v["skipped"].items())) or "none"
    head = f"variant    {name}: {v['published']} of {v['gated']} versions passed the gate (skipped: {skipped})"
    s = v["served"]
    if s is None:
        return f"{head}; served: fp32 throughout"
    fallback = ", ".join(f"{why} {n:,}" for why, n in sorted(s["fallback"].items())) or "none"
    replayed = f"{head}\n           --serving-variant {name} (replayed): "
    if not s["by_variant"]:  # its versions came too late for the node's rule: fp32 answered everything
        return f"{replayed}no request by the variant of {s['requests']:,}; fallback to fp32: {fallback}"
    return (
        f"{replayed}{s['by_variant']:,} of {s['requests']:,} requests"
        f" by the variant, acc {s['accuracy_variant']} vs fp32 {s['accuracy_fp32']} on the same requests;"
        f" node {s['node_accuracy']} vs {s['node_accuracy_fp32']}; fallback to fp32: {fallback};"
        f" p50 b1 {s['latency_b1_p50_ms']} vs {s['latency_b1_p50_ms_fp32']} ms ({s['speedup_b1']}x, gate)"
    )


#: The replayed variant curves' colours, in the order of ``DemoConfig.variants``.
_VARIANT_COLORS = ("#8a2be2", "#d2691e", "#008b8b", "#b8860b")

_VARIANTS_NOTE = (
    "<p>Each variant is derived by the trainer from every version and gated on the examples learned after it "
    "(accuracy within <code>variant_max_accuracy_drop</code> of its parent; a speed variant also "
    "<code>variant_min_speedup</code> times faster). The run's node served fp32. For each variant that passed, "
    "the requests are answered again as a node started with <code>--serving-variant</code> would have answered "
    "them: the newest passing version read by then, while at most <code>serving_variant_max_lag</code> versions "
    "behind the fp32 version the node served, else fp32 (the fallback). <i>acc variant / fp32</i>: on the "
    "requests the variant answered, its answers and the fp32 answers the application got. Latency: the gate's "
    "p50 of the prediction path at batch 1 (not HTTP), variant and parent measured interleaved.</p>"
)


def variants_table(variants: dict[str, dict[str, Any]]) -> str:
    """The ``variants`` of the summary as an HTML table (empty without variants)."""
    if not variants:
        return ""
    head = (
        "variant",
        "versions gated",
        "passed",
        "skipped (reason: n)",
        "requests by the variant",
        "acc variant / fp32, same requests",
        "node acc / fp32 (after the drift)",
        "fallback to fp32 (why: n)",
        "p50 b1 ms variant / fp32 (speed-up)",
        "params ×",
        "bytes ×",
    )
    rows = []
    for name, v in variants.items():
        skipped = "<br>".join(
            f"<span title='{escape(v['skip_example'].get(r, ''), quote=True)}'>{escape(r)}: {n}</span>"
            for r, n in sorted(v["skipped"].items())
        )
        cells = [f"<code>{escape(name)}</code>", str(v["gated"]), str(v["published"]), skipped or "—"]
        s = v["served"]
        if s is None or not s["by_variant"]:
            why = "no version passed" if s is None else "its versions came too late"
            cells += [f"0 (fp32 throughout: {why})", *["—"] * 6]
        else:
            fallback = "<br>".join(f"{escape(w)}: {n:,}" for w, n in sorted(s["fallback"].items())) or "none"
            cells += [
                f"{s['by_variant']:,} of {s['requests']:,}",
                f"{s['accuracy_variant']} / {s['accuracy_fp32']}",
                (
                    f"{s['node_accuracy']} / {s['node_accuracy_fp32']} ({s['node_after_drift']} / "
                    f"{s['node_after_drift_fp32']})"
                ),
                fallback,
                f"{s['latency_b1_p50_ms']} / {s['latency_b1_p50_ms_fp32']} ({s['speedup_b1']}×)",
                str(s["parameters_ratio"]),
                str(s["bytes_ratio"]),
            ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        "<h2>Serving variants</h2><table border='1' cellpadding='4' style='border-collapse:collapse'><tr>"
        + "".join(f"<th>{escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
        + _VARIANTS_NOTE
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


#: Text width estimate for the labels of the marks (11 px sans-serif).
_CHAR_PX = 6.2


def label_rows(marks: Sequence[tuple[float, str]], *, gap: float = 6.0) -> list[int]:
    """The row (0: nearest the plot) of each mark's label, drawn from its x to the right, so none overlap.

    >>> label_rows([(100.0, "drift"), (104.0, "detected"), (400.0, "late")])
    [0, 1, 0]
    """
    ends: list[float] = []  # per row, where its last label ends
    rows = []
    for x, text in marks:
        row = next((r for r, end in enumerate(ends) if x >= end + gap), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = x + len(text) * _CHAR_PX
        rows.append(row)
    return rows


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (an axis top).

    >>> nice_ceiling(11.5), nice_ceiling(36.2), nice_ceiling(0.7), nice_ceiling(0)
    (20.0, 50.0, 1.0, 1.0)
    """
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= value)


def _per_second(points: Sequence[Served]) -> list[tuple[float, float, float]]:
    """(second, p50 ms, p99 ms) of the latencies of the answers in each second of the run."""
    buckets: dict[int, list[float]] = {}
    for s in points:
        buckets.setdefault(int(s.sent_at), []).append(s.latency_s * 1000)
    return [(t + 0.5, quantile(v, 0.5) or 0.0, quantile(v, 0.99) or 0.0) for t, v in sorted(buckets.items())]


def report_html(
    config: DemoConfig,
    served: list[Served | None],
    t0: float,
    drift_wall: float | None,
    summary: dict[str, Any],
    baseline: Baseline | None = None,
    variants: Sequence[VariantRun] = (),
) -> str:
    """A self-contained HTML page: the summary, an SVG plot of served accuracy and latency over time,
    and the serving variants' table.

    The plot is also written alone to ``served_accuracy.svg`` in ``config.out``.
    """
    curves = Curves.of(served, config.rolling_window, baseline, variants)
    points = [s for s in served if s is not None]  # in the order of curves.index
    w, left, right = 960, 56, 16
    acc_top, acc_h = 58, 300  # room above the plot for the marks' labels
    lat_top, lat_h = acc_top + acc_h + 40, 110
    legend_top = lat_top + lat_h + 34
    h = legend_top + 76
    t_max = max((s.sent_at for s in points), default=1.0) or 1.0

    def x(t: float) -> float:
        return left + (w - left - right) * t / t_max

    def y(a: float) -> float:
        return acc_top + acc_h * (1 - a)

    step = max(1, len(points) // 1200)

    def polyline(curve: Sequence[float], start: int, color: str, dash: str = "") -> str:
        pts = " ".join(f"{x(points[n].sent_at):.1f},{y(curve[n]):.1f}" for n in range(start, len(points), step))
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{extra} points="{pts}"/>'

    parts = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">'),
        (f'<rect x="{left}" y="{acc_top}" width="{w - left - right}" height="{acc_h}" fill="#fafafa" stroke="#ccc"/>'),
        (
            f'<text x="{left}" y="14" font-size="13" font-weight="bold">Served accuracy, last '
            f"{curves.window} requests (from the first full window)</text>"
        ),
    ]
    for a in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        parts.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{a:.1f}</text>'
        )
    ticks = range(0, int(t_max) + 1, 10 if t_max > 30 else 5)
    for t in ticks:
        for bottom in (acc_top + acc_h, lat_top + lat_h):
            parts.append(f'<text x="{x(t):.1f}" y="{bottom + 14}" text-anchor="middle">{t}s</text>')
    # Model versions: a tick where the served version changed.
    last = None
    for s in points:
        if s.version != last:
            parts.append(
                f'<line x1="{x(s.sent_at):.1f}" x2="{x(s.sent_at):.1f}" y1="{acc_top + acc_h}" '
                f'y2="{acc_top + acc_h - 8}" stroke="#4a7"><title>v{s.version}</title></line>'
            )
            last = s.version
    marks: list[tuple[float, str, str]] = []
    if drift_wall is not None:
        marks.append((drift_wall - t0, "#c33", "drift"))
    if summary["drift"]["detected_at_s"] is not None:
        marks.append((summary["drift"]["detected_at_s"], "#e90", "detected"))
    marks.sort()
    for (at, color, label), row in zip(marks, label_rows([(x(at), lab) for at, _, lab in marks]), strict=True):
        parts.append(
            f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{acc_top - 4 - 13 * row}" '
            f'y2="{lat_top + lat_h}" stroke="{color}" stroke-dasharray="5,3"/>'
            f'<text x="{x(at) + 3:.1f}" y="{acc_top - 6 - 13 * row}" fill="{color}">{label}</text>'
        )
    legend = [("#247", "", "served (learning live)")]
    if baseline is not None and curves.static is not None:
        start = next((n for n, i in enumerate(curves.index) if i >= baseline.first), len(points))
        parts.append(polyline(curves.static, max(start, curves.window - 1), "#999", "6,3"))
        since = f" kept from {points[start].sent_at:.1f}s" if start < len(points) else ""
        legend.append(("#999", "6,3", f"without learning: v{baseline.version}{since}"))
    for (name, curve), color in zip(curves.variants.items(), _VARIANT_COLORS, strict=False):
        parts.append(polyline(curve, min(curves.window - 1, len(points)), color, "2,2"))
        legend.append((color, "2,2", f"--serving-variant {name} (replayed)"))
    parts.append(polyline(curves.live, min(curves.window - 1, len(points)), "#247"))
    # Latency, on the same time axis.
    seconds = _per_second(points)
    top_ms = nice_ceiling(max((p99 for _, _, p99 in seconds), default=1.0))

    def ly(ms: float) -> float:
        return lat_top + lat_h * (1 - min(ms, top_ms) / top_ms)

    parts.append(
        f'<text x="{left}" y="{lat_top - 8}" font-size="13" font-weight="bold">Latency per second'
        f" (request to answer), ms</text>"
    )
    parts.append(
        f'<rect x="{left}" y="{lat_top}" width="{w - left - right}" height="{lat_h}" fill="#fafafa" stroke="#ccc"/>'
    )
    for ms in (0.0, top_ms / 2, top_ms):
        parts.append(
            f'<line x1="{left}" x2="{w - right}" y1="{ly(ms):.1f}" y2="{ly(ms):.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{ly(ms) + 4:.1f}" text-anchor="end">{ms:g}</text>'
        )
    for i, color in ((1, "#6a3"), (2, "#a36")):
        pts = " ".join(f"{x(p[0]):.1f},{ly(p[i]):.1f}" for p in seconds)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.4" points="{pts}"/>')
    legend += [
        ("#6a3", "", "latency p50"),
        ("#a36", "", "latency p99"),
        ("#c33", "5,3", "drift (concept changes)"),
        ("#e90", "5,3", "drift detected"),
        ("#4a7", "", "model swap at the node (tick)"),
    ]
    # The legend under the plots, entries flowing left to right, wrapped to the width.
    lx, row = float(left), 0
    for color, dash, text in legend:
        width = 28 + len(text) * _CHAR_PX + 24
        if lx + width > w - right and lx > left:
            lx, row = float(left), row + 1
        ly_ = legend_top + 18 * row
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{lx:.1f}" x2="{lx + 22:.1f}" y1="{ly_ - 4}" y2="{ly_ - 4}" stroke="{color}" '
            f'stroke-width="2"{extra}/><text x="{lx + 28:.1f}" y="{ly_}">{escape(text)}</text>'
        )
        lx += width
    if baseline is not None:
        parts.append(
            f'<text x="{left}" y="{legend_top + 18 * (row + 1) + 4}" fill="#555">Without learning: the '
            f"version the node served when the concept changed (read back from the model topic) answers "
            f'every later request of this run,</text><text x="{left}" y="{legend_top + 18 * (row + 1) + 18}"'
            f' fill="#555">scored like the live answers.</text>'
        )
    parts.append("</svg>")
    svg = "\n".join(parts)
    (config.out / "served_accuracy.svg").write_text(svg)
    return (
        "<!doctype html><meta charset='utf-8'><title>stream-learner demo</title>"
        "<h1>stream-learner demo</h1>"
        + svg
        + variants_table(summary.get("variants", {}))
        + "<h2>Summary</h2><pre>"
        + escape(json.dumps(summary, indent=2))
        + "</pre>"
    )
