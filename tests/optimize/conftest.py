"""Fixtures of the variant tests: trainer settings on fresh topics, variants on."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from stream_learner.config import Settings

from ..learn.streams import AGRAWAL_FEATURES


@pytest.fixture
def vsettings(settings: Settings, keys, tmp_path: Path) -> Settings:
    return msgspec.structs.replace(
        settings,
        trainer_model="m",
        trainer_features=AGRAWAL_FEATURES,
        trainer_classes=["0", "1"],
        trainer_hidden=[64, 64],
        trainer_signing_key=str(keys[0]),
        trainer_state_dir=str(tmp_path / "state"),
        trainer_checkpoint_every_examples=2000,
        trainer_checkpoint_every_s=3600,
        trainer_max_wait_ms=200,
        trainer_group_id=f"{settings.topic_examples}-trainer",
        serving_public_keys=[str(keys[1])],
        trainer_variants=["int8", "pruned", "student"],
        variant_int8_min_features=16,
        variant_heldout_examples=500,
        variant_min_heldout_examples=100,
        variant_window=1000,
        # What is tested here is publishing, verifying and serving; the gate's bounds are tested in
        # test_units.py and measured by bench/bench_variants.py (an early student on 2000 examples is
        # far below its teacher: the gate rightly skips it at 0.5 points).
        variant_min_speedup=1.0,
        variant_max_accuracy_drop=30.0,
        trainer_student_hidden=[32, 32],
    )
