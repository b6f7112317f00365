"""Deriving, gating and publishing the variants of each version: the trainer's and replay's session hook.

:class:`SessionVariants` attaches to a
:class:`~stream_learner.learn.session.LearningSession`:

1. **at a version** ``v`` (after ``v`` is published, or when the session
   restores the state of ``v``), it keeps ``v``'s servable weights, the
   student's weights at ``v`` and the recent window before ``v`` (the
   examples ``v`` learned last: the fine-tune's data);
2. **held out**: the examples the session learns after ``v``, which ``v``
   never trained on, gather in the learner's recent window;
3. **the decision** comes after the chunk that brings
   ``variant_heldout_examples`` labeled ones, or, at the latest, just before
   the next version is saved (then with what there is; fewer than
   ``variant_min_heldout_examples`` skips them): for each recipe,
   :func:`~stream_learner.optimize.variants.make_variant`, then the gate
   (:func:`derive`); a variant that passes is published as version ``v`` of
   the lineage ``<model>#<variant>`` with its own signed manifest
   (:func:`variant_manifest`), one that does not is counted and logged with
   its reason.

A variant is decided before the next version's state is saved, so after a
crash the restored session derives it again from the same state and the same
held-out examples; a variant version already on the output is not published
twice. The weights of a variant are a function of the stream; whether it is
published also depends on latencies measured on this machine.

The ``stream-learner optimize`` role (:mod:`~stream_learner.optimize.role`)
calls the same :func:`derive` and :func:`variant_manifest`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import structlog

from ..checkpoint.output import Output
from ..checkpoint.publish import weights_info
from ..config import Settings
from ..events import CheckpointManifest, VariantInfo, now_ms
from ..learn.featurizer import STATS
from ..metrics import Metrics
from .gate import GateConfig, Verdict, decide, latency, score
from .variants import NAMES, Parent, Servable, Variant, VariantSkipped, make_variant, recipe_of
from .window import Window

log = structlog.get_logger(__name__)

__all__ = [
    "LineagePublisher",
    "Outcome",
    "SessionVariants",
    "derive",
    "gate_config",
    "lineage",
    "recipes",
    "variant_manifest",
]


def lineage(model: str, variant: str) -> str:
    """The model name a variant is published under.

    >>> lineage("churn", "int8")
    'churn#int8'
    """
    return f"{model}#{variant}"


def recipes(settings: Settings, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The recipes of ``names`` (default ``trainer_variants``) with the settings' parameters, in build order."""
    wanted = list(settings.trainer_variants if names is None else names)
    finetune = {"epochs": settings.variant_finetune_epochs}
    overrides: dict[str, dict[str, Any]] = {
        "int8": {"min_features": settings.variant_int8_min_features},
        "pruned": {"fraction": settings.variant_prune_fraction, **finetune},
        "sparse": {"fraction": settings.variant_sparse_fraction, **finetune},
        "student": {},
    }
    return [recipe_of(name, overrides[name]) for name in NAMES if name in wanted]


def gate_config(settings: Settings) -> GateConfig:
    """The gate the settings describe."""
    return GateConfig(
        max_drop=settings.variant_max_accuracy_drop,
        min_speedup=settings.variant_min_speedup,
        serving_batch=settings.variant_serving_batch,
        heldout_examples=settings.variant_heldout_examples,
        min_heldout_examples=settings.variant_min_heldout_examples,
        latency_budget_s=settings.variant_latency_budget_s,
    )


@dataclass
class Outcome:
    """One variant of one version: built and gated, published or skipped (``verdict`` says why)."""

    name: str
    version: int
    verdict: Verdict
    measured: dict[str, float] = field(default_factory=dict)
    variant: Variant | None = None
    manifest: CheckpointManifest | None = None  # the signed manifest, when published


def derive(
    parent: Parent, recipe_list: Sequence[dict[str, Any]], window: Window, heldout: Window, gate: GateConfig
) -> list[Outcome]:
    """Build every recipe's variant of ``parent`` and gate it on ``heldout`` (not published here).

    ``measured`` holds the gate's numbers (:mod:`~stream_learner.optimize.gate`) with the parent's
    next to the variant's (``parent_*``), parameter counts and safetensors bytes, the build and gate
    time (``build_seconds``, ``gate_seconds``).
    """
    parent_predictor = parent.servable.predictor()
    parent_bytes = float(len(parent.servable.weights_bytes(parent.model)))
    rows = heldout.labeled().rows(parent.servable.spec.features)
    outcomes: list[Outcome] = []
    for recipe in recipe_list:
        name = str(recipe["name"])
        try:
            variant = make_variant(parent, recipe, window)
        except VariantSkipped as exc:
            outcomes.append(Outcome(name, parent.version, Verdict(False, exc.label, f"{name}: {exc}")))
            continue
        began = time.perf_counter()
        predictor = variant.servable.predictor()
        measured = score(parent_predictor, predictor, heldout)
        if measured["heldout_examples"] >= gate.min_heldout_examples:
            mine, theirs = latency([predictor, parent_predictor], rows, budget_s=gate.latency_budget_s)
            measured.update(mine)
            measured.update({f"parent_{k}": v for k, v in theirs.items()})
            for b in (1, 64):
                measured[f"speedup_b{b}"] = theirs[f"latency_b{b}_p50_ms"] / mine[f"latency_b{b}_p50_ms"]
        measured.update(
            parameters=float(variant.servable.parameters),
            parent_parameters=float(parent.servable.parameters),
            bytes=float(len(variant.servable.weights_bytes(lineage(parent.model, name)))),
            parent_bytes=parent_bytes,
            build_seconds=variant.build_seconds,
            gate_seconds=time.perf_counter() - began,
            **variant.details,
        )
        outcomes.append(Outcome(name, parent.version, decide(name, measured, gate), measured, variant))
    return outcomes


def variant_manifest(
    parent_manifest: CheckpointManifest, outcome: Outcome, chunk_bytes: int
) -> tuple[CheckpointManifest, bytes]:
    """The unsigned manifest and the weights of a passing variant, as version ``v`` of ``<model>#<variant>``.

    ``parent`` names the parent version (a variant's lineage has one version per parent version);
    counts, metrics, drift state and input offsets are the parent's; ``variant`` says what it is.
    """
    assert outcome.variant is not None
    name = lineage(parent_manifest.model, outcome.name)
    weights = outcome.variant.servable.weights_bytes(name)
    manifest = msgspec.structs.replace(
        parent_manifest,
        model=name,
        parent=parent_manifest.version,
        created_at=now_ms(),
        architecture=outcome.variant.servable.spec.to_dict(),
        weights=weights_info(weights, chunk_bytes),
        signature=None,
        variant=VariantInfo(
            name=outcome.name,
            parent_model=parent_manifest.model,
            parent_version=parent_manifest.version,
            parent_sha256=parent_manifest.weights.sha256,
            recipe=outcome.variant.recipe,
            measured=outcome.measured,
        ),
    )
    return manifest, weights


def count(metrics: Metrics | None, outcome: Outcome) -> None:
    """Count and log an outcome."""
    if outcome.verdict.publish:
        log.info(
            "variant_published",
            variant=outcome.name,
            version=outcome.version,
            **{k: round(v, 6) for k, v in outcome.measured.items()},
        )
        if metrics is not None:
            metrics.variants_published.labels(variant=outcome.name).inc()
    else:
        log.warning(
            "variant_skipped",
            variant=outcome.name,
            version=outcome.version,
            reason=outcome.verdict.label,
            detail=outcome.verdict.reason,
        )
        if metrics is not None:
            metrics.variants_skipped.labels(variant=outcome.name, reason=outcome.verdict.label).inc()
    if metrics is not None and outcome.measured:
        metrics.variant_seconds.labels(variant=outcome.name).observe(
            outcome.measured.get("build_seconds", 0.0) + outcome.measured.get("gate_seconds", 0.0)
        )


class LineagePublisher:
    """Publishes versions of derived lineages (``<model>#<name>``), each version at most once.

    The one publishing path of what a session derives from its versions: the
    serving variants (:class:`SessionVariants`) and the challenger
    (:mod:`~stream_learner.optimize.challenger`). ``output_for(lineage)``
    gives the output a lineage publishes to (opened on first use; its newest
    version read then).
    """

    def __init__(self, output_for: Callable[[str], Output]) -> None:
        self.output_for = output_for
        self.outputs: dict[str, Output] = {}
        self.latest: dict[str, int] = {}  # per lineage, the newest version its output holds

    def publish(
        self, name: str, version: int, build: Callable[[], tuple[CheckpointManifest, bytes]]
    ) -> CheckpointManifest | None:
        """Sign and publish version ``version`` of lineage ``name`` (``build()`` makes its unsigned manifest
        and weights); ``None`` when the output holds that version already (derived again after a restart)."""
        output = self.outputs.get(name)
        if output is None:
            output = self.outputs[name] = self.output_for(name)
            self.latest[name] = output.latest_version()
        if version <= self.latest[name]:
            return None
        manifest, weights = build()
        signed = output.publish(manifest, weights)
        self.latest[name] = version
        return signed

    def close(self) -> None:
        """Release the outputs."""
        for output in self.outputs.values():
            output.close()
        self.outputs.clear()


@dataclass
class _Pending:
    manifest: CheckpointManifest
    parent: Parent
    window: Window
    start: int  # the recent window's running index at the version: held out from here


class SessionVariants:
    """The variants of every version a session publishes (see the module docstring).

    ``output_for(lineage)`` gives the output a variant lineage publishes to
    (the session's kind: the model topic, or a directory); ``on_outcome``
    sees every outcome (tests, the bench).
    """

    def __init__(
        self,
        recipe_list: Sequence[dict[str, Any]],
        gate: GateConfig,
        *,
        output_for: Callable[[str], Output],
        chunk_bytes: int,
        metrics: Metrics | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.recipes = list(recipe_list)
        self.gate = gate
        self.chunk_bytes = chunk_bytes
        self.metrics = metrics
        self.on_outcome = on_outcome
        self.publisher = LineagePublisher(output_for)
        self.pending: _Pending | None = None
        self.outcomes: list[Outcome] = []
        self.session: Any = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, output_for: Callable[[str], Output], metrics: Metrics | None = None
    ) -> SessionVariants | None:
        """The hook ``trainer_variants`` asks for, or ``None`` when it is empty."""
        if not settings.trainer_variants:
            return None
        return cls(
            recipes(settings),
            gate_config(settings),
            output_for=output_for,
            chunk_bytes=settings.trainer_chunk_bytes,
            metrics=metrics,
        )

    def attach(self, session: Any) -> SessionVariants:
        """Chain this hook into ``session``'s callbacks (theirs run first); return ``self``."""
        self.session = session
        built, published, chunk = session.on_built, session.on_published, session.on_chunk

        def on_built(b: Any) -> None:
            if built is not None:
                built(b)
            self.decide()

        def on_published(signed: CheckpointManifest) -> None:
            if published is not None:
                published(signed)
            self.start(signed)

        def on_chunk(result: Any, n: int) -> None:
            if chunk is not None:
                chunk(result, n)
            self.chunk()

        session.on_built, session.on_published, session.on_chunk = on_built, on_published, on_chunk
        return self

    def restored(self, meta: dict[str, Any] | None) -> None:
        """After the session restored ``meta`` (``None``: fresh): the restored version's variants are pending again."""
        if meta is None or meta.get("manifest") is None:
            return
        manifest = msgspec.convert(meta["manifest"], CheckpointManifest)
        if self.pending is None or self.pending.manifest.version != manifest.version:
            self.start(manifest)

    # -- the steps -----------------------------------------------------------------------------

    def start(self, manifest: CheckpointManifest) -> None:
        """Keep what the variants of ``manifest``'s version are derived from (the learner is at it)."""
        learner = self.session.learner
        if learner.recent is None:
            raise RuntimeError("the learner keeps no recent window: build it with variant settings")
        stats = dict(learner.featurizer.state_dict())
        stats["target"] = learner.target.state_tensor()
        model = {f"model.{k}": v.detach().clone() for k, v in learner.main.model.state_dict().items()}
        student = None
        if learner.student is not None:
            student = Servable(learner.student.spec, {**learner.student.servable(), **stats})
        parent = Parent(manifest.model, manifest.version, Servable(learner.spec, {**model, **stats}), student)
        assert set(STATS) <= set(stats)
        self.pending = _Pending(manifest, parent, learner.recent.window(), learner.recent.total)

    def chunk(self) -> None:
        """After a chunk: decide once enough held-out labeled examples were learned."""
        p = self.pending
        if p is not None and self.session.learner.recent.since(p.start).n_labeled >= self.gate.heldout_examples:
            self.decide()

    def decide(self) -> list[Outcome]:
        """Gate the pending version's variants on the examples held out so far; publish those that pass."""
        p, self.pending = self.pending, None
        if p is None:
            return []
        heldout = self.session.learner.recent.since(p.start)
        labeled = np.flatnonzero(~np.isnan(heldout.labels))
        if len(labeled) > self.gate.heldout_examples:  # exactly the first N, wherever the chunk ended
            heldout = heldout.head(int(labeled[self.gate.heldout_examples - 1]) + 1)
        outcomes = derive(p.parent, self.recipes, p.window, heldout, self.gate)
        for outcome in outcomes:
            if outcome.verdict.publish:
                outcome.manifest = self._publish(p.manifest, outcome)
            count(self.metrics, outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
        self.outcomes.extend(outcomes)
        return outcomes

    def _publish(self, parent_manifest: CheckpointManifest, outcome: Outcome) -> CheckpointManifest | None:
        signed = self.publisher.publish(
            lineage(parent_manifest.model, outcome.name),
            outcome.version,
            lambda: variant_manifest(parent_manifest, outcome, self.chunk_bytes),
        )
        if signed is None:
            # Derived again after a restart: that version is out already (never published twice).
            log.info("variant_already_published", variant=outcome.name, version=outcome.version)
        return signed

    def close(self) -> None:
        """Release the variant outputs."""
        self.publisher.close()
