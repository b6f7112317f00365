"""Fixtures of the replay tests: settings for the trainer and the joiner on fresh topics (keys: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from stream_learner.config import Settings


@pytest.fixture
def rsettings(settings: Settings, keys, tmp_path: Path) -> Settings:
    """Settings for a joiner, a trainer and replays of model ``m`` (features ``x``, classes ``a``/``b``)."""
    return msgspec.structs.replace(
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
        joiner_window_ms=5_000,
        joiner_late_retention_ms=10**9,
        joiner_orphan_retention_ms=60_000,
        joiner_state_ttl_ms=2 * 10**9,
        joiner_idle_advance=False,
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        joiner_group_id=f"{settings.topic_predictions}-joiner",
        joiner_redis_prefix="{" + settings.topic_predictions + "}:",
    )
