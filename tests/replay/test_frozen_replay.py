"""Replay on a frozen base: an examples replay of a LoRA trainer publishes the live trainer's versions,
deltas and full ones alike, bit for bit (each a delta on the same base, so no chain to rebuild)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.learn.trainer import Trainer

from ..learn.streams import AGRAWAL_FEATURES, agrawal_examples
from ..learn.test_frozen_base import ARCH, LORA, write_base
from ..learn.test_trainer import produce_examples
from .test_replay import replay


@pytest.mark.slow
def test_an_examples_replay_on_a_frozen_base_equals_the_live_trainer(rsettings: Settings, tmp_path: Path) -> None:
    s = msgspec.structs.replace(
        rsettings,
        trainer_features=AGRAWAL_FEATURES,
        trainer_classes=["0", "1"],
        trainer_architecture=ARCH,
        trainer_seed=3,
        trainer_base_weights=str(write_base(tmp_path / "base.safetensors")),
        trainer_trainable="lora",
        trainer_lora_layers=list(LORA),
        trainer_lora_rank=4,
        trainer_lora_alpha=8.0,
        trainer_head_modules=["head"],
        trainer_full_checkpoint_every=2,
        trainer_checkpoint_every_examples=500,
        trainer_checkpoint_every_s=3600,
    )
    produce_examples(s, agrawal_examples(2_000, unlabeled=0.2, seed=3))
    live = Trainer(s)
    try:
        while sum(live.offsets.values()) < 2_000 or live.buffer:
            live.step()
        live.checkpoint()
    finally:
        live.close()
    public = load_public_key(Path(s.trainer_signing_key).with_suffix(".pub.pem"))
    want = read_latest(s, s.topic_models, public, "m")

    _r, got = replay(s, "fb", source="examples")  # to the model topic, lineage m@replay-fb
    mine = read_latest(s, s.topic_models, public, "m@replay-fb")
    assert mine.manifest.version == want.manifest.version
    assert mine.manifest.layout == want.manifest.layout and mine.manifest.layout.base_sha256 is not None
    assert got["final_sha256_as_live"] == want.manifest.weights.sha256
    assert set(mine.tensors) == set(want.tensors)
    for name, tensor in want.tensors.items():
        assert torch.equal(mine.tensors[name], tensor), name
    assert {p["version"] for p in got["published"]} == set(range(1, want.manifest.version + 1))
