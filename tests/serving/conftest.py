"""Fixtures and helpers of the serving tests: a producer, small identifiable checkpoints (keys: tests/conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stream_learner.bus import make_producer
from stream_learner.checkpoint import encode_tensors, publish_checkpoint, weights_info
from stream_learner.config import Settings
from stream_learner.events import CheckpointManifest
from stream_learner.learn.models import ModelSpec

MODEL = "m"
FEATURES = ["a", "b"]
#: A regression model whose output for ROW is exactly 4 * version (see ``identifiable``).
SPEC = ModelSpec(kind="logreg", task="regression", features=FEATURES)
ROW = {"a": 1.0, "b": 2.0}


@pytest.fixture(autouse=True)
def _serving_state_in_tmp(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving nodes remember their floor under ``serving_state_dir`` (relative by default): in this
    test's own directory, for it and the processes it starts."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def producer(settings: Settings) -> Iterator[Any]:
    """The trainer's idempotent acks=all producer."""
    p = make_producer(settings)
    yield p
    p.close()


def stats(n: int = len(FEATURES)) -> dict[str, torch.Tensor]:
    """Featurizer and target statistics that leave features and outputs unscaled."""
    zeros = torch.zeros(n, dtype=torch.float64)
    return {
        "featurizer.count": zeros,
        "featurizer.mean": zeros.clone(),
        "featurizer.m2": zeros.clone(),
        "target": torch.zeros(3, dtype=torch.float64),
    }


def identifiable(version: int) -> dict[str, torch.Tensor]:
    """Servable weights of SPEC whose prediction for ROW is 4 * version.

    Weight and bias both carry the version, so a model mixing two
    versions' tensors would answer something no single version answers
    (3 * old + new is not 4 * anything between them).
    """
    return {
        "model.weight": torch.tensor([[float(version), float(version)]]),
        "model.bias": torch.tensor([float(version)]),
        **stats(),
    }


def manifest(
    version: int,
    weights: bytes,
    *,
    architecture: dict[str, Any] | None = None,
    chunk_bytes: int = 128,
    model: str = MODEL,
) -> CheckpointManifest:
    """An unsigned manifest for ``weights``."""
    return CheckpointManifest(
        model=model,
        version=version,
        parent=version - 1 if version > 1 else None,
        created_at=1_767_225_600_000 + version,
        input_offsets=[],
        counts={"labeled": version},
        metrics={},
        drift_state={},
        feature_spec=list(FEATURES),
        architecture=architecture if architecture is not None else SPEC.to_dict(),
        weights=weights_info(weights, chunk_bytes),
    )


def publish(
    producer: Any,
    topic: str,
    key: Ed25519PrivateKey,
    version: int,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    weights: bytes | None = None,
    architecture: dict[str, Any] | None = None,
    chunk_bytes: int = 128,
    model: str = MODEL,
) -> CheckpointManifest:
    """Publish a version (identifiable weights unless given) in several small chunks; the signed manifest."""
    data = weights if weights is not None else encode_tensors(tensors or identifiable(version), {"model": model})
    return publish_checkpoint(
        producer,
        topic,
        manifest(version, data, architecture=architecture, chunk_bytes=chunk_bytes, model=model),
        data,
        key,
        chunk_bytes=chunk_bytes,
    )


def wait_for(
    condition: Callable[[], Any],
    timeout_s: float = 30.0,
    what: str = "condition",
    step: Callable[[], Any] = lambda: time.sleep(0.02),
    detail: Callable[[], Any] = lambda: "",
) -> Any:
    """Run ``step`` until ``condition`` is truthy; fail the test after ``timeout_s``, with ``detail()``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what} {detail()}")
        step()


def step_until(sub: Any, condition: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Call ``sub.poll_once()`` until ``condition`` holds (a subscriber without its thread)."""
    return wait_for(condition, timeout_s, what, step=sub.poll_once, detail=lambda: f"; status {sub.status()}")
