"""The demo's summary (``summary.json``) and the few lines a person reads of it.

Served accuracy is scored by the application; the join, the checkpoints and
the drift detections come from the monitor; freshness is, per label, the time
from the application sending it to the node serving a model whose manifest
says it trained on that label's example. The static baseline (what users
would have been served without learning) is :mod:`.baseline`'s; the worst
point and the recovery are read off :class:`~.curves.Curves`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ...sdk import SDKStats
from .app import DemoConfig, Served
from .baseline import Baseline
from .curves import Curves, quantile
from .monitor import Observed
from .variants import VariantRun, summarize_variants


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


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
