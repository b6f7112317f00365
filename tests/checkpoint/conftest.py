"""Fixtures of the checkpoint tests: model states, manifests, Kafka clients (keys: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from stream_learner.bus import make_producer
from stream_learner.checkpoint import encode_tensors, make_reader_consumer, weights_info
from stream_learner.checkpoint.publish import H_CHUNK_INDEX
from stream_learner.config import Settings
from stream_learner.events import CheckpointManifest, Source


def model_state(version: int, hidden: int = 1024) -> dict[str, torch.Tensor]:
    """An MLP's state dict (about 1.06M parameters at hidden=1024), different per version."""
    torch.manual_seed(version)
    net = torch.nn.Sequential(
        torch.nn.Linear(512, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["steps"] = torch.tensor(version * 1000, dtype=torch.int64)
    return state


def manifest_for(
    weights: bytes, model: str = "churn", version: int = 1, created_at: int | None = None, **fields: Any
) -> CheckpointManifest:
    """A complete, unsigned manifest describing ``weights``."""
    base: dict[str, Any] = {
        "model": model,
        "version": version,
        "parent": version - 1 if version > 1 else None,
        "created_at": created_at if created_at is not None else 1_767_225_600_000 + version,
        "input_offsets": [Source(topic="sl.examples", partition=0, offset=100 * version)],
        "counts": {"labeled": 10 * version, "pseudo": version},
        "metrics": {"accuracy": 0.9, "log_loss": 0.25},
        "drift_state": {"adwin_error": {"n": version, "drifts": 0}},
        "feature_spec": ["age", "tenure_months"],
        "architecture": {"kind": "mlp", "hidden": [1024]},
        "weights": weights_info(weights),
    }
    base.update(fields)
    return CheckpointManifest(**base)


def checkpoint_bytes(version: int, hidden: int = 1024) -> tuple[dict[str, torch.Tensor], bytes]:
    """A version's state and its safetensors bytes."""
    state = model_state(version, hidden)
    return state, encode_tensors(state, {"version": str(version)})


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (NaN and -0.0 included)."""
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert (x.dtype, tuple(x.shape)) == (y.dtype, tuple(y.shape)), name
        assert torch.equal(
            x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)
        ), name


#: Apache Kafka's default ``message.max.bytes``. Tansu accepted 128 MiB
#: records, so the producer enforces Kafka's limit in its place.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


@pytest.fixture
def producer(settings: Settings) -> Iterator[Any]:
    """The trainer's idempotent acks=all producer, refusing what Kafka would refuse."""
    p = make_producer(settings, max_request_size=KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
    yield p
    p.close()


class CountingConsumer:
    """A consumer that counts the records its polls return."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.records = 0
        self.polls = 0

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        batch = self.inner.poll(*args, **kwargs)
        self.polls += 1
        self.records += sum(len(records) for records in batch.values())
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def consumer(settings: Settings) -> Iterator[CountingConsumer]:
    """A reader's consumer (no group) that counts what it reads."""
    c = make_reader_consumer(settings)
    yield CountingConsumer(c)
    c.close()


class Acked:
    """A send's future, already acknowledged at ``partition``/``offset`` (for producers faked in memory)."""

    def __init__(self, partition: int, offset: int) -> None:
        self.partition, self.offset = partition, offset

    def get(self, timeout: float | None = None) -> Acked:
        return self


class TamperingProducer:
    """Passes sends through, flipping one byte of one chunk on the way."""

    def __init__(self, inner: Any, chunk_index: int) -> None:
        self.inner, self.chunk_index = inner, str(chunk_index).encode()

    def send(self, topic: str, **kwargs: Any) -> Any:
        if (H_CHUNK_INDEX, self.chunk_index) in kwargs["headers"]:
            value = bytearray(kwargs["value"])
            value[len(value) // 2] ^= 0x01
            kwargs["value"] = bytes(value)
        return self.inner.send(topic, **kwargs)
