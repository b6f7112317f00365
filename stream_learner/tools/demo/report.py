"""The demo's HTML page: the plot, the serving variants' table and the summary, in one self-contained file.

The summary is :mod:`.summary`'s, the plot :mod:`.plot`'s (also written
alone to ``served_accuracy.svg``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from typing import Any

from .app import DemoConfig, Served
from .baseline import Baseline
from .curves import Curves
from .plot import served_svg
from .variants import VariantRun

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
    svg = served_svg(served, curves, t0, drift_wall, summary["drift"]["detected_at_s"], baseline)
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
