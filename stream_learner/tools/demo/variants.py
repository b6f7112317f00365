"""Serving variants in the demo: what the trainer's gate decided, and what a node serving each one would have served.

The trainer derives the variants the demo asks for (``DemoConfig.variants``)
from every version it publishes and gates each on the examples learned after
that version (:mod:`stream_learner.optimize`). Its decisions, published or
skipped with the reason, are read from its log (:func:`gate_decisions`).

The run's node serves the fp32 model. For each variant that published at
least one version, the same requests are then answered again as a node
started with ``--serving-variant <name>`` would have answered them
(:func:`replay_choice`): when each request was answered, the newest version
of the variant the monitor had read by then is chosen against the fp32
version the node was serving by the node's own rule
(:func:`stream_learner.serving.variant.choose`: the variant while it is at
most ``serving_variant_max_lag`` versions behind, else the parent, the
*fallback*). A fallback answer is the one the application got; a variant
answer comes from that variant version read back from the model topic and
verified like a node loads it (:mod:`.baseline`'s loader), and is scored the
way the trainer scores served predictions
(:class:`~stream_learner.learn.evaluation.ServedClasses`). So the variant's
accuracy and the fp32 model's are measured on the same requests.

Latency: a variant answers through the same predictor path as its parent;
what it costs is the gate's measurement, signed in each published manifest
(the whole prediction path at batch 1, p50, variant and parent interleaved in
the trainer, on this machine).
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import Settings
from ...learn.evaluation import Mean, ServedClasses
from ...optimize.hook import lineage
from ...serving.variant import choose
from .app import MODEL, Row, Served
from .baseline import load_version

_BATCH = 2048


@dataclass(frozen=True)
class Decision:
    """One gate decision of the trainer: variant ``variant`` of version ``version``, published or why not."""

    variant: str
    version: int
    published: bool
    reason: str = ""  # the counted label (accuracy, slower, too_few_examples, not_applicable)
    detail: str = ""


def gate_decisions(lines: Iterable[str]) -> list[Decision]:
    """The trainer's ``variant_published`` and ``variant_skipped`` log events (JSON lines), in order.

    >>> gate_decisions(['{"event": "variant_skipped", "variant": "int8", "version": 3, '
    ...                 '"reason": "not_applicable", "detail": "int8: no layer"}', "not json"])
    [Decision(variant='int8', version=3, published=False, reason='not_applicable', detail='int8: no layer')]
    """
    out = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the run's log also holds what is not an event (a traceback, say)
        kind = event.get("event") if isinstance(event, dict) else None
        if kind in ("variant_published", "variant_skipped"):
            out.append(
                Decision(
                    str(event["variant"]),
                    int(event["version"]),
                    kind == "variant_published",
                    str(event.get("reason", "")),
                    str(event.get("detail", "")),
                )
            )
    return out


@dataclass(frozen=True)
class _V:
    version: int


@dataclass(frozen=True)
class Choice:
    """What a node following a variant serves one request with: ``variant`` version, or the parent and why."""

    variant: int | None
    fallback: str = ""  # "no_variant_yet" or "variant_behind" when the parent serves
    why: str = ""  # the node's reason, as ``GET /model`` says it


def replay_choice(served: Sequence[Served | None], arrivals: Mapping[int, float], max_lag: int) -> list[Choice | None]:
    """Per request (``None``: not answered), what a node following the variant would have served.

    ``arrivals``: variant version -> when it could first be served (seconds
    after the start, the axis of ``Served.sent_at``); the parent is the
    version the real node answered the request with.

    >>> s = [Served(0.5, 1, True), None, Served(2.5, 2, True), Served(3.5, 4, False)]
    >>> [c and (c.variant, c.fallback) for c in replay_choice(s, {1: 2.0}, 1)]
    [(None, 'no_variant_yet'), None, (1, ''), (None, 'variant_behind')]
    """
    times = sorted((t, v) for v, t in arrivals.items())
    at = [t for t, _ in times]
    newest: list[int] = []  # newest version arrived by each arrival (a node never swaps back to an older one)
    for _, v in times:
        newest.append(max(v, newest[-1]) if newest else v)
    out: list[Choice | None] = []
    for s in served:
        if s is None:
            out.append(None)
            continue
        n = bisect.bisect_right(at, s.sent_at)
        variant = _V(newest[n - 1]) if n else None
        chosen, why = choose(_V(s.version), variant, max_lag)
        if variant is not None and chosen is variant:
            out.append(Choice(variant.version))
        else:
            out.append(Choice(None, "no_variant_yet" if variant is None else "variant_behind", why))
    return out


def _accuracy(values: Iterable[bool]) -> float | None:
    mean = Mean()
    for v in values:
        mean.update(float(v))
    return round(mean.cumulative, 4) if mean.n else None


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


@dataclass(frozen=True)
class VariantRun:
    """One variant in the run: the gate's decisions, and, when some version passed, the replayed node.

    ``correct[i]``: whether the node following the variant answered request
    ``i`` right (``None``: not answered); ``choices[i]`` what it served it with.
    """

    name: str
    decisions: list[Decision]
    manifests: dict[int, Any]
    choices: list[Choice | None] | None = None
    correct: list[bool | None] | None = None

    def summary(self, served: Sequence[Served | None], drift_index: int) -> dict[str, Any]:
        """The variant's entry in ``summary.json`` (see :func:`summarize_variants`)."""
        skipped = Counter(d.reason for d in self.decisions if not d.published)
        examples: dict[str, str] = {}
        for d in self.decisions:
            if not d.published:
                examples[d.reason] = d.detail  # the latest of each reason
        out: dict[str, Any] = {
            "lineage": lineage(MODEL, self.name),
            "gated": len(self.decisions),
            "published": sum(d.published for d in self.decisions),
            "skipped": dict(skipped),
            "skip_example": examples,
            "served": None,
        }
        if self.choices is None or self.correct is None:
            return out
        live = [(i, s) for i, s in enumerate(served) if s is not None]
        answered = dict(live)
        by_variant = [i for i, _ in live if (c := self.choices[i]) is not None and c.variant is not None]
        fallbacks = Counter(c.fallback for c in self.choices if c is not None and c.variant is None)
        versions = sorted({c.variant for c in self.choices if c is not None and c.variant is not None})
        measured = [self.manifests[v].variant.measured for v in versions if v in self.manifests]
        mine = [m["latency_b1_p50_ms"] for m in measured if "latency_b1_p50_ms" in m]
        theirs = [m["parent_latency_b1_p50_ms"] for m in measured if "parent_latency_b1_p50_ms" in m]
        p_v, p_p = _median(mine), _median(theirs)
        ratio = [m["parameters"] / m["parent_parameters"] for m in measured if m.get("parent_parameters")]
        size = [m["bytes"] / m["parent_bytes"] for m in measured if m.get("parent_bytes")]
        served_correct = self.correct
        out["served"] = {
            "requests": len(live),
            "by_variant": len(by_variant),
            "fallback": dict(fallbacks),
            "versions_served": len(versions),
            # On the requests the variant answered: its answers, and the fp32 answers the application got.
            "accuracy_variant": _accuracy(bool(served_correct[i]) for i in by_variant),
            "accuracy_fp32": _accuracy(answered[i].correct for i in by_variant),
            # The whole node (the variant where it served, the parent where it fell back) against the run's.
            "node_accuracy": _accuracy(bool(c) for c in served_correct if c is not None),
            "node_accuracy_fp32": _accuracy(s.correct for _, s in live),
            "node_after_drift": _accuracy(
                bool(c) for i, c in enumerate(served_correct) if c is not None and i >= drift_index
            ),
            "node_after_drift_fp32": _accuracy(s.correct for i, s in live if i >= drift_index),
            "latency_b1_p50_ms": p_v,
            "latency_b1_p50_ms_fp32": p_p,
            "speedup_b1": round(p_p / p_v, 3) if p_v and p_p else None,
            "parameters_ratio": _median(ratio),
            "bytes_ratio": _median(size),
        }
        return out


def replay_variants(
    settings: Settings,
    rows: list[Row],
    served: list[Served | None],
    names: Sequence[str],
    seen: Mapping[str, Mapping[int, tuple[Any, float]]],
    decisions: Sequence[Decision],
    t0: float,
) -> list[VariantRun]:
    """Every variant of ``names``: its decisions and, where versions were published, the replayed node."""
    classes = ServedClasses({c: i for i, c in enumerate(settings.trainer_classes)})
    out = []
    for name in names:
        mine = [d for d in decisions if d.variant == name]
        published = seen.get(name, {})
        manifests = {v: m for v, (m, _) in published.items()}
        if not published:
            out.append(VariantRun(name, mine, manifests))
            continue
        choices = replay_choice(
            served, {v: at - t0 for v, (_, at) in published.items()}, settings.serving_variant_max_lag
        )
        correct: list[bool | None] = [None if s is None else s.correct for s in served]  # fallback: the live answer
        todo: dict[int, list[int]] = {}
        for i, c in enumerate(choices):
            if c is not None and c.variant is not None:
                todo.setdefault(c.variant, []).append(i)
        for version, requests in sorted(todo.items()):
            model = load_version(settings, version, lineage(MODEL, name))
            for start in range(0, len(requests), _BATCH):
                batch = requests[start : start + _BATCH]
                for i, answer in zip(batch, model.predict([rows[i][0] for i in batch]), strict=True):
                    got = classes.of(answer)
                    correct[i] = got is not None and got[0] == rows[i][1]
        out.append(VariantRun(name, mine, manifests, choices, correct))
    return out


def summarize_variants(
    runs: Sequence[VariantRun], served: Sequence[Served | None], drift_index: int
) -> dict[str, dict[str, Any]]:
    """``summary.json``'s ``variants``: per variant, the gate (``gated``, ``published``, ``skipped`` by
    reason with the latest ``skip_example`` of each) and ``served``: the replayed node (``None`` when no
    version passed: a node following it serves the fp32 model throughout)."""
    return {r.name: r.summary(served, drift_index) for r in runs}


def read_log(path: Path) -> list[Decision]:
    """:func:`gate_decisions` of a log file (none when it is missing)."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8", errors="replace") as f:
        return gate_decisions(f)
