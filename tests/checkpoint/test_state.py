"""The trainer's state stores: exact, atomic round trips; a crash never tears a snapshot.

One check suite runs against every implementation of the ``StateStore`` contract.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from stream_learner.checkpoint import (
    CheckpointError,
    DirectoryStateStore,
    RedisStateStore,
    Snapshot,
    StateStore,
    encode_tensors,
)
from stream_learner.checkpoint.state import STATE_FILE, decode_snapshot, encode_snapshot
from stream_learner.local import LocalServers

from .conftest import assert_bit_identical


@pytest.fixture(params=["directory", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """Each implementation of the contract, empty."""
    if request.param == "directory":
        yield DirectoryStateStore(tmp_path / "state")
        return
    servers: LocalServers = request.getfixturevalue("servers")
    client = redis.Redis.from_url(servers.redis_url)
    key = f"test:state:{uuid.uuid4().hex}"
    yield RedisStateStore(client, key)
    client.delete(key)
    client.close()


def numbered(i: int, size: int = 1000) -> Snapshot:
    """Snapshot ``i``: every tensor filled with ``i``, so a torn one is visible."""
    return Snapshot(
        {"w": torch.full((size,), float(i)), "step": torch.tensor(i, dtype=torch.int64)},
        {"i": i, "offsets": {"sl.examples:0": i * 10}},
    )


def consistent(snapshot: Snapshot) -> bool:
    i = snapshot.meta["i"]
    return bool((snapshot.tensors["w"] == i).all()) and int(snapshot.tensors["step"]) == i


def test_the_contract(store: StateStore) -> None:
    assert isinstance(store, StateStore)
    assert store.load() is None
    torch.manual_seed(1)
    tensors = {
        "model.0.weight": torch.randn(64, 32),
        "optimizer.exp_avg": torch.randn(64, 32, dtype=torch.float64),
        "optimizer.step": torch.tensor(12345, dtype=torch.int64),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "specials": torch.tensor([float("nan"), -0.0, float("inf")]),
        "empty": torch.empty(0),
    }
    meta = {
        "offsets": {"sl.examples": {"0": 1041, "1": 998}},
        "version": 7,
        "dedup": ["ex-1", "ex-2"],
        "drift": {"adwin": {"width": 310, "mean": 0.125, "warning": False}},
        "note": "prédiction ✓",
        "nothing": None,
    }
    store.save(Snapshot(tensors, meta))
    loaded = store.load()
    assert loaded is not None
    assert_bit_identical(loaded.tensors, tensors)
    assert loaded.meta == meta
    # A second save replaces the first entirely.
    store.save(numbered(2))
    again = store.load()
    assert again is not None and again.meta == numbered(2).meta and set(again.tensors) == {"w", "step"}


@pytest.mark.parametrize("meta", [{"t": (1, 2)}, {1: "x"}, {"x": float("nan")}, {"x": object()}])
def test_meta_that_would_not_come_back_equal_is_refused(store: StateStore, meta: dict) -> None:
    with pytest.raises(ValueError, match="meta"):
        store.save(Snapshot({}, meta))
    assert store.load() is None


def test_readers_never_see_a_torn_snapshot(store: StateStore) -> None:
    store.save(numbered(0, size=200_000))
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                snap = store.load()
                assert snap is not None and consistent(snap), snap and snap.meta
                seen.append(snap.meta["i"])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(1, 30):
        store.save(numbered(i, size=200_000))
    stop.set()
    reader.join()
    assert not errors, errors[0]
    assert seen == sorted(seen) and len(seen) > 1


def test_a_failed_rename_keeps_the_previous_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DirectoryStateStore(tmp_path)
    store.save(numbered(1))

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.save(numbered(2))
    monkeypatch.undo()
    loaded = store.load()
    assert loaded is not None and loaded.meta["i"] == 1 and consistent(loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary left behind


def test_a_failed_write_keeps_the_previous_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DirectoryStateStore(tmp_path)
    store.save(numbered(1))
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save(numbered(2))
    monkeypatch.setattr(os, "fsync", real_fsync)
    loaded = store.load()
    assert loaded is not None and loaded.meta["i"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


_WRITER = """
import sys, torch
from stream_learner.checkpoint import DirectoryStateStore, Snapshot
store = DirectoryStateStore(sys.argv[1])
i = 0
while True:
    i += 1
    store.save(Snapshot({"w": torch.full((2_000_000,), float(i)), "step": torch.tensor(i)}, {"i": i}))
    print(i, flush=True)
"""


@pytest.mark.slow
def test_a_writer_killed_at_any_moment_leaves_a_whole_snapshot(tmp_path: Path) -> None:
    # A real SIGKILL at a random moment. Probabilistic: a writer that wrote the
    # state file in place was caught tearing it in 20-60% of such kills.
    rng = random.Random(7)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            acknowledged = 0
            for _ in range(3):
                acknowledged = int(proc.stdout.readline())
            time.sleep(rng.uniform(0, 0.02))  # land somewhere inside a later save
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        loaded = DirectoryStateStore(tmp_path).load()
        assert loaded is not None and consistent(loaded)
        assert loaded.meta["i"] >= acknowledged  # what save() returned for is there
        assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # leftovers cleaned on open


def test_only_state_snapshots_are_loaded(tmp_path: Path, servers: LocalServers) -> None:
    (tmp_path / STATE_FILE).write_bytes(encode_tensors({"w": torch.zeros(1)}, {"format": "other"}))
    with pytest.raises(CheckpointError, match="not a stream-learner state"):
        DirectoryStateStore(tmp_path).load()
    (tmp_path / STATE_FILE).write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(CheckpointError, match="not safetensors"):
        DirectoryStateStore(tmp_path).load()
    client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
    key = f"test:state:{uuid.uuid4().hex}"
    try:
        client.set(key, "text")
        with pytest.raises(CheckpointError, match="decodes responses"):
            RedisStateStore(client, key).load()
    finally:
        client.delete(key)
        client.close()
    assert decode_snapshot(encode_snapshot(numbered(3))).meta == numbered(3).meta


def test_redis_save_waits_for_the_aof(servers: LocalServers) -> None:
    client = redis.Redis.from_url(servers.redis_url)
    key = f"test:state:{uuid.uuid4().hex}"
    try:
        store = RedisStateStore(client, key)
        store.save(numbered(1))
        assert store.wait_aof, "the local Valkey runs with AOF on, so WAITAOF must stay on"
    finally:
        client.delete(key)
        client.close()
