"""The demo's SVG plot: served accuracy over time, and the latency of each second under it on the same axis.

The accuracy panel draws the :class:`~.curves.Curves` (live, without
learning, each replayed variant), a tick where the served version changed,
and the drift and its detection as marks whose labels never overlap
(:func:`label_rows`); the latency panel draws p50 and p99 per second of the
run under an axis top from :func:`nice_ceiling`; the legend flows under both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from .app import Served
from .baseline import Baseline
from .curves import Curves, quantile

#: The replayed variant curves' colours, in the order of ``DemoConfig.variants``.
_VARIANT_COLORS = ("#8a2be2", "#d2691e", "#008b8b", "#b8860b")

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


def served_svg(
    served: Sequence[Served | None],
    curves: Curves,
    t0: float,
    drift_wall: float | None,
    detected_at_s: float | None,
    baseline: Baseline | None = None,
) -> str:
    """The plot as one SVG document: ``curves`` (of ``served``) over time, the drift at ``drift_wall``
    (wall clock, the run starting at ``t0``) and its detection at ``detected_at_s`` (run seconds)."""
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
    if detected_at_s is not None:
        marks.append((detected_at_s, "#e90", "detected"))
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
    return "\n".join(parts)
