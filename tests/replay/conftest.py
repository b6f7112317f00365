"""Fixtures of the replay tests: settings for the trainer and the joiner on fresh topics (keys: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from stream_learner.config import Settings

from ..join.helpers import oracle_joiner


@pytest.fixture
def rsettings(settings: Settings, keys, tmp_path: Path) -> Settings:
    """Settings for a joiner, a trainer and replays of model ``m`` (features ``x``, classes ``a``/``b``)."""
    trainer = msgspec.structs.replace(
        settings,
        trainer_model="m",
        trainer_features=["x"],
        trainer_classes=["a", "b"],
        trainer_hidden=[8],
        trainer_signing_key=str(keys[0]),
        trainer_state_dir=str(tmp_path / "trainer-state"),
        trainer_checkpoint_every_examples=500,
        trainer_checkpoint_every_s=3600,
        trainer_max_wait_ms=200,
        trainer_group_id=f"{settings.topic_examples}-trainer",
        replay_state_dir=str(tmp_path / "replay"),
        replay_join_step_events=400,
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
    )
    return oracle_joiner(trainer, 5_000, "joiner")
