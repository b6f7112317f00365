"""Fixtures of the trainer tests: trainer settings on fresh topics (the signing keys: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from stream_learner.config import Settings

from .streams import AGRAWAL_FEATURES


def agrawal_trainer(settings: Settings, keys, tmp_path: Path, **overrides) -> Settings:
    """A trainer of a small MLP on the Agrawal features (``tests.learn.streams``), on ``settings``' topics."""
    trainer = msgspec.structs.replace(
        settings,
        trainer_model="m",
        trainer_features=AGRAWAL_FEATURES,
        trainer_classes=["0", "1"],
        trainer_hidden=[16],
        trainer_signing_key=str(keys[0]),
        trainer_state_dir=str(tmp_path / "state"),
        trainer_checkpoint_every_examples=1000,
        trainer_checkpoint_every_s=3600,
        trainer_max_wait_ms=200,
        trainer_group_id=f"{settings.topic_examples}-trainer",
    )
    return msgspec.structs.replace(trainer, **overrides)


@pytest.fixture
def tsettings(settings: Settings, keys, tmp_path: Path) -> Settings:
    # Off by default (issue 14); on here, so that the pseudo-label state is killed and restored too.
    return agrawal_trainer(settings, keys, tmp_path, trainer_pseudo_enabled=True)
