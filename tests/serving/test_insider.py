"""Issue 17.7 and 18.6 at full size: a holder of the signing key publishes a checkpoint built to exhaust the node."""

from __future__ import annotations

from typing import Any

import pytest

from stream_learner.config import Settings
from stream_learner.metrics import Metrics
from stream_learner.serving import CheckpointSubscriber

from .conftest import MODEL, ROW, publish, step_until
from .test_subscriber import failures
from .test_topic_attacks import rss_kib


@pytest.mark.slow
def test_a_signed_checkpoint_with_a_100_mb_safetensors_header_is_refused_with_memory_bounded(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    publish(producer, settings.topic_models, keypair[0], 1)
    metrics = Metrics()
    sub = CheckpointSubscriber(settings, keypair[1], model=MODEL, metrics=metrics)
    try:
        step_until(sub, lambda: sub.version == 1, what="v1")
        before = rss_kib()
        size = 99_999_992  # just under the format's own 100 MB ceiling
        weights = size.to_bytes(8, "little") + b"{" + b" " * (size - 2) + b"}"
        publish(producer, settings.topic_models, keypair[0], 2, weights=weights, chunk_bytes=512 * 1024)
        del weights
        step_until(sub, lambda: sub.status()["failures"] >= 1, timeout_s=120, what="v2 refused")
        status = sub.status()
        assert status["failures_by_reason"] == {"limit": 1}, status
        assert "safetensors header of 99999992 bytes, the limit is 1048576" in status["last_error"]
        assert failures(metrics, "limit") == 1.0
        assert sub.version == 1 and sub.current.predict_one(ROW) == 4.0
        # What it cost: the chunk window (64 MiB at most) and the fetches, not the 3.3 GiB of parsing it.
        grown_mib = (rss_kib() - before) / 1024
        assert grown_mib < 200, f"RSS grew {grown_mib:.0f} MiB"
        publish(producer, settings.topic_models, keypair[0], 3)
        step_until(sub, lambda: sub.version == 3, what="v3 after the refusal")
    finally:
        sub.stop()
