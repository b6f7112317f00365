"""What a checkpoint of a learner holds: its manifest and the weights a serving node needs.

With a frozen base a version is a *delta* or *full* (``WeightsLayout``): a
delta holds what the trainer's state holds of the model (every tensor but
the frozen parameters, which are the base's) and the statistics; a full
checkpoint adds the frozen parameters. A delta is relative to the base,
never to another version, so any one delta and the base are a whole model:
a node may start from, pin or roll back to any version. Floating model
tensors are published in the layout's ``dtype``; the statistics keep theirs.
"""

from __future__ import annotations

import torch

from ..checkpoint.codec import encode_tensors
from ..checkpoint.publish import weights_info
from ..events import CheckpointManifest, Source, WeightsLayout, now_ms
from .featurizer import STATS, TOKENIZER_PREFIX
from .frozen import DTYPES, Dtype
from .learner import OnlineLearner


def build_manifest(
    learner: OnlineLearner,
    *,
    model: str,
    version: int,
    parent: int | None,
    input_offsets: list[Source],
    weights: bytes,
    chunk_bytes: int,
    layout: WeightsLayout | None = None,
) -> CheckpointManifest:
    """The (unsigned) manifest of ``learner``'s current state as checkpoint ``version`` of ``model``."""
    c = learner.counts
    counts = {
        "labeled": c["labeled"],
        "pseudo": c["pseudo"],
        "late": c["late"],
        "skipped": c["duplicates"] + c["other_model"] + c["rejected"] + c["pseudo_skipped"],
        "duplicates": c["duplicates"],
        "rollbacks": c["rollbacks"],
        "skipped_non_finite": c["skipped_non_finite"],
        "batches": c["batches"],
    }
    if learner.spec.inputs:
        # What only inputs with kinds can meet (a numeric spec's manifest stays as it was).
        f = learner.featurizer.counts
        counts.update(rejected=c["rejected"], unknown_categories=f["unknown_category"], truncated_texts=f["truncated"])
    return CheckpointManifest(
        model=model,
        version=version,
        parent=parent,
        created_at=now_ms(),
        input_offsets=input_offsets,
        counts=counts,
        metrics=learner.summary(),
        drift_state=learner.drift_counts,
        feature_spec=list(learner.spec.features),
        architecture=learner.spec.to_dict(),
        weights=weights_info(weights, chunk_bytes),
        layout=layout,
    )


def layout_for(
    learner: OnlineLearner, version: int, *, dtype: Dtype, full_every: int, full: bool
) -> WeightsLayout | None:
    """The layout of ``version``: ``None`` for an ordinary float32 model without a base (its manifest
    is what it always was); a delta when the model has frozen parameters, unless ``full`` was asked
    for or ``version`` is a multiple of ``full_every`` (0: never by number)."""
    base = learner.config.base
    if base is None and dtype == "float32":
        return None
    frozen = bool(learner.main.frozen)
    delta = frozen and not full and not (full_every and version % full_every == 0)
    return WeightsLayout(dtype=dtype, base_sha256=base.sha256 if base is not None else None, delta=delta)


def servable_weights(
    state_tensors: dict[str, torch.Tensor],
    layout: WeightsLayout | None = None,
    frozen: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """What a serving node needs from the learner's state: the main model's parameters
    (``model.*``), the featurizer statistics (and each text's tokenizer) and the target scaling.

    With a ``layout``, floating model tensors are cast to its dtype, and a full one (not a delta)
    also holds the ``frozen`` parameters (the base's values: :meth:`OnlineLearner.frozen_tensors`).
    """
    out = {f"model.{k[len('main.model.') :]}": v for k, v in state_tensors.items() if k.startswith("main.model.")}
    if layout is not None and not layout.delta and frozen:
        out.update({f"model.{k}": v for k, v in frozen.items()})
    if layout is not None and layout.dtype != "float32":
        dtype = DTYPES[layout.dtype]
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    out.update({k: state_tensors[k] for k in STATS})
    # A text's tokenizer travels with the weights it was learned with (signed by their digest).
    out.update({k: v for k, v in state_tensors.items() if k.startswith(TOKENIZER_PREFIX)})
    out["target"] = state_tensors["target"]
    return out


def weights_bytes(
    state_tensors: dict[str, torch.Tensor],
    model: str,
    layout: WeightsLayout | None = None,
    frozen: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """The safetensors file a checkpoint of ``model`` publishes, derived from the saved state (and,
    for a full checkpoint on a base, the base's values), so a republish after a crash yields the
    very bytes (and digest) the saved manifest describes."""
    return encode_tensors(servable_weights(state_tensors, layout, frozen), {"model": model})
