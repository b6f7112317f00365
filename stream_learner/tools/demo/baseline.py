"""Without learning: what users would have been served had the model stopped learning at the drift.

The counterfactual is computed in the same run, on the same requests: the
model version the node served when the concept changed is read back from the
model topic (verified with the trainer's public key, as a node loads it) and
answers every request from the first one that version served. Requests
before that were served by earlier versions in both worlds, so they keep
what the application actually got. Predictions go through the served
model's predictor, the node's own, and are scored exactly as the
application scores the node's answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...config import Settings
from .app import MODEL, Row, Served

if TYPE_CHECKING:
    from ...serving.model import ServedModel

_BATCH = 2048


@dataclass(frozen=True)
class Baseline:
    """The static model's answers: ``version`` kept from request ``first`` on.

    ``correct[i]`` is whether request ``i`` would have been answered right
    (``None`` for a request the node never answered, left out like in the
    live curve).
    """

    version: int
    first: int
    correct: list[bool | None]


def static_baseline(
    settings: Settings, rows: list[Row], served: list[Served | None], drift_index: int
) -> Baseline | None:
    """The baseline for this run, or ``None`` when no request before the drift was answered."""
    before = [(i, s) for i, s in enumerate(served[:drift_index]) if s is not None]
    if not before:
        return None
    version = before[-1][1].version  # what served the last request of the old concept
    first = next(i for i, s in before if s.version == version)
    model = load_version(settings, version)
    correct: list[bool | None] = [None if s is None else s.correct for s in served]
    todo = [i for i in range(first, len(rows)) if served[i] is not None]
    for start in range(0, len(todo), _BATCH):
        batch = todo[start : start + _BATCH]
        for i, answer in zip(batch, model.predict([rows[i][0] for i in batch]), strict=True):
            assert isinstance(answer, dict)  # a classifier: class -> probability
            correct[i] = int(max(answer, key=answer.__getitem__)) == rows[i][1]
    return Baseline(version, first, correct)


def load_version(settings: Settings, version: int, model: str = MODEL) -> ServedModel:
    """Version ``version`` of ``model`` (a variant: its lineage) read back from the model topic,
    verified and built as a node loads it; version 0 of the model is the cold-start model."""
    from ...checkpoint.reader import read_version
    from ...learn.frozen import load_base
    from ...serving import cold_start_model, load_served_model, public_keys_from_settings
    from ...serving.model import BuildPolicy

    if version == 0 and model == MODEL:  # the cold-start model served it: the trainer's untrained starting point
        return cold_start_model(settings)
    checkpoint = read_version(settings, settings.topic_models, public_keys_from_settings(settings), version, model)
    # Built as the node builds it: its allowed factories and limits, and its base for a delta version.
    bases = (
        [load_base(settings.serving_base_weights, what="serving_base_weights")] if settings.serving_base_weights else []
    )
    policy = BuildPolicy.of(settings.serving_allowed_architectures, settings.serving_max_parameters, bases=bases)
    return load_served_model(checkpoint, policy)
