"""What a checkpoint of a learner holds: its manifest and the weights a serving node needs."""

from __future__ import annotations

import torch

from ..checkpoint.codec import encode_tensors
from ..checkpoint.publish import weights_info
from ..events import CheckpointManifest, Source, now_ms
from .featurizer import STATS, TOKENIZER_PREFIX
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
    )


def servable_weights(state_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a serving node needs from the learner's state: the main model's parameters
    (``model.*``), the featurizer statistics (and each text's tokenizer) and the target scaling."""
    out = {f"model.{k[len('main.model.') :]}": v for k, v in state_tensors.items() if k.startswith("main.model.")}
    out.update({k: state_tensors[k] for k in STATS})
    # A text's tokenizer travels with the weights it was learned with (signed by their digest).
    out.update({k: v for k, v in state_tensors.items() if k.startswith(TOKENIZER_PREFIX)})
    out["target"] = state_tensors["target"]
    return out


def weights_bytes(state_tensors: dict[str, torch.Tensor], model: str) -> bytes:
    """The safetensors file a checkpoint of ``model`` publishes, derived from the saved state, so a
    republish after a crash yields the very bytes (and digest) the saved manifest describes."""
    return encode_tensors(servable_weights(state_tensors), {"model": model})
