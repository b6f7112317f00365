"""Publishing the trainer's challenger as its own lineage, for shadow traffic (``serving_shadow``).

While the learner trains a challenger (the drift policy starts one at a
warning with ``trainer_drift_challenger_on_warning``, and promotes or drops it
at the next drift), every version ``v`` the session publishes is followed by
version ``v`` of the lineage ``<model>#challenger``: the challenger's weights
at ``v`` with the champion's featurizer and target statistics (the learner
keeps one set for both), signed like any checkpoint, through the variants'
publishing path (:class:`~stream_learner.optimize.hook.LineagePublisher`,
:func:`~stream_learner.optimize.hook.variant_manifest`). Its manifest is a
variant's: ``variant.name`` is ``challenger``, the parent is the champion's
``v`` (and its weights digest); ``metrics`` and ``variant.measured`` hold the
two models' scores on the labeled examples both were scored on since the
challenger started (:func:`challenge_scores`), so both sides of the
comparison travel signed with the weights.

A model on a frozen base publishes no challenger (it would be a whole model
every version, where the champion publishes a delta); it is still trained
and scored, and the gauges show both scores.

No challenger running, no ``<model>#challenger`` version: a node that shadows
it sees the lineage fall behind the champion and stops shadowing
(:mod:`stream_learner.serving.shadow`). Versions are the champion's, so they
only grow, across challengers too.

Crashes: the learner's state at ``v`` holds the challenger, so a session that
restores ``v`` (or republishes it) publishes the challenger of ``v`` if the
output lacks it; a version already out is never published twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from ..checkpoint.output import Output
from ..events import CheckpointManifest
from ..learn.featurizer import STATS
from ..learn.learner import OnlineLearner
from ..metrics import Metrics
from .gate import Verdict
from .hook import LineagePublisher, Outcome, lineage, variant_manifest
from .variants import Servable, Variant

log = structlog.get_logger(__name__)

__all__ = ["CHALLENGER", "SessionChallenger", "challenge_scores", "challenger_manifest"]

#: The variant name (and lineage suffix) the challenger is published under.
CHALLENGER = "challenger"


def challenge_scores(learner: OnlineLearner) -> dict[str, float] | None:
    """The champion's and the challenger's scores on the same labeled examples since the challenger started
    (``None``: no challenger runs): ``{champion,challenger}_accuracy`` (cumulative, what promotion compares),
    ``..._accuracy_rolling`` (the last ``trainer_metrics_window``) and ``examples`` (how many were scored)."""
    if learner.challenger is None:
        return None
    scores = learner.prequential
    out: dict[str, float] = {}
    for side, board in (("champion", scores.champion_scores), ("challenger", scores.challenger_scores)):
        for key, value in board.summary().items():  # finite values only
            out[f"{side}_{key}"] = value
    out["examples"] = float(scores.challenger_scores.means["accuracy"].n)
    return out


def challenger_servable(learner: OnlineLearner) -> Servable:
    """The challenger as a checkpoint holds a model: its ``model.*`` tensors and the learner's statistics."""
    assert learner.challenger is not None
    stats = dict(learner.featurizer.state_dict())
    stats["target"] = learner.target.state_tensor()
    assert set(STATS) <= set(stats)
    # A whole float32 model (a frozen base's parameters included): no layout, nothing to join on the node.
    model = {f"model.{k}": v.detach().cpu().clone() for k, v in learner.challenger.model.state_dict().items()}
    return Servable(learner.spec, {**model, **stats})


def challenger_manifest(
    learner: OnlineLearner, parent: CheckpointManifest, chunk_bytes: int
) -> tuple[CheckpointManifest, bytes]:
    """The unsigned manifest and the weights of version ``parent.version`` of ``<model>#challenger``."""
    scores = challenge_scores(learner) or {}
    variant = Variant(CHALLENGER, challenger_servable(learner), {"name": CHALLENGER}, 0.0)
    outcome = Outcome(CHALLENGER, parent.version, Verdict(True, "published", ""), dict(scores), variant)
    manifest, weights = variant_manifest(parent, outcome, chunk_bytes)
    # Its own scores, not the champion's (variant_manifest keeps the parent's); a whole model: no layout.
    return msgspec.structs.replace(manifest, metrics=dict(scores), layout=None), weights


class SessionChallenger:
    """Attached to a :class:`~stream_learner.learn.session.LearningSession`: publishes the challenger of
    every version published while one runs (see the module docstring)."""

    def __init__(
        self, *, output_for: Callable[[str], Output], chunk_bytes: int, metrics: Metrics | None = None
    ) -> None:
        self.publisher = LineagePublisher(output_for)
        self.chunk_bytes = chunk_bytes
        self.metrics = metrics
        self.published: list[CheckpointManifest] = []  # the challenger versions this process published
        self.refused_frozen = False  # logged once: a frozen base's challenger is not published
        self.session: Any = None

    def attach(self, session: Any) -> SessionChallenger:
        """Chain this hook into ``session``'s ``on_published`` (theirs runs first); return ``self``."""
        self.session = session
        published = session.on_published

        def on_published(signed: CheckpointManifest) -> None:
            if published is not None:
                published(signed)
            self.publish(signed)

        session.on_published = on_published
        return self

    def restored(self, meta: dict[str, Any] | None) -> None:
        """After the session restored ``meta``: the learner is exactly at the saved version, so its
        challenger (if one runs) is published for it, unless that version is out already."""
        if meta is None or meta.get("manifest") is None:
            return
        self.publish(msgspec.convert(meta["manifest"], CheckpointManifest))

    def publish(self, parent: CheckpointManifest) -> CheckpointManifest | None:
        """Publish the running challenger as version ``parent.version`` of ``<model>#challenger`` (the
        learner must be at that version); ``None`` if no challenger runs or that version is out already."""
        learner: OnlineLearner = self.session.learner
        if learner.challenger is None:
            return None
        name = lineage(parent.model, CHALLENGER)
        if learner.main.frozen:
            # A challenger on a frozen base would go out as a whole model every version (256 MB for the
            # 64M bench model, where the champion's delta is 0.8 MB): not published; it is still scored.
            if not self.refused_frozen:
                log.warning("challenger_not_published", model=name, reason="frozen_base")
                self.refused_frozen = True
            return None
        signed = self.publisher.publish(
            name, parent.version, lambda: challenger_manifest(learner, parent, self.chunk_bytes)
        )
        if signed is None:
            log.info("challenger_already_published", model=name, version=parent.version)
            return None
        self.published.append(signed)
        log.info("challenger_published", model=name, version=signed.version, metrics=signed.metrics)
        if self.metrics is not None:
            self.metrics.variants_published.labels(variant=CHALLENGER).inc()
        return signed

    def close(self) -> None:
        """Release the challenger's output."""
        self.publisher.close()
