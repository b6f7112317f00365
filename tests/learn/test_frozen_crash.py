"""Crash test on a frozen base: a LoRA (or head-only) trainer process SIGKILLed at random moments ends
bit-identical to one that never stopped.

The pattern of ``test_trainer_crash.py`` with a token encoder on a frozen "pretrained" base, LoRA adapters
on its attention (plus the head), deltas and full checkpoints (every third version) both published. The
state either run ends with (the adapters, the head, their optimizer moments, the last good copies) must be
equal bit for bit, the published tensors of their last versions too, and the crashed run's versions must
have no gaps and no repeats.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import torch

from stream_learner.bus import ensure_topics
from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.checkpoint.state import DirectoryStateStore
from stream_learner.config import Settings

from ..procs import settings_env, train_uninterrupted
from .streams import agrawal_examples
from .test_frozen_base import ARCH, LORA, write_base
from .test_trainer import produce_examples
from .test_trainer_crash import manifests

N = 12_000
KILLS = 6
SEED = 13


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["lora", "head"])
def test_a_sigkilled_trainer_on_a_frozen_base_matches_an_uninterrupted_one(
    tsettings: Settings, keys, tmp_path: Path, trainable: str
) -> None:
    produce_examples(tsettings, agrawal_examples(N, unlabeled=0.2, seed=SEED))
    base = msgspec.structs.replace(
        tsettings,
        trainer_architecture=ARCH,
        trainer_seed=3,
        trainer_base_weights=str(write_base(tmp_path / "base.safetensors")),
        trainer_trainable=trainable,
        trainer_lora_layers=list(LORA),
        trainer_lora_rank=4,
        trainer_lora_alpha=8.0,
        trainer_head_modules=["head"],
        trainer_full_checkpoint_every=3,
        trainer_checkpoint_every_examples=1000,
        trainer_checkpoint_every_s=1.0,
        log_format="json",
    )
    reference = msgspec.structs.replace(base, trainer_state_dir=str(tmp_path / "ref"))
    train_uninterrupted(reference, N)

    crashed = msgspec.structs.replace(
        base, trainer_state_dir=str(tmp_path / "crashed"), topic_models=base.topic_models + ".crashed"
    )
    ensure_topics(crashed)
    env = settings_env(crashed)
    log = (tmp_path / "trainer.log").open("w")
    rng = random.Random(SEED)
    cmd = [sys.executable, "-m", "stream_learner.cli", "trainer"]
    for _ in range(KILLS):
        proc = subprocess.Popen(cmd, env=env, stderr=log)
        time.sleep(rng.uniform(2.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc = subprocess.Popen(cmd, env=env, stderr=log)
    public = load_public_key(keys[1])
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                latest = read_latest(crashed, crashed.topic_models, public, "m", timeout_s=10)
            except Exception:
                continue
            if latest.manifest.input_offsets[0].offset == N:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    log.close()
    tail = (tmp_path / "trainer.log").read_text()[-3000:]

    want = DirectoryStateStore(reference.trainer_state_dir).load()
    got = DirectoryStateStore(crashed.trainer_state_dir).load()
    assert want is not None and got is not None, tail
    assert got.meta["position"] == want.meta["position"], tail
    assert got.meta["learner"]["counts"] == want.meta["learner"]["counts"], tail
    kept = sorted(k for k in want.tensors if k.startswith("main."))
    assert kept == sorted(k for k in got.tensors if k.startswith("main.")), tail
    # Only what learns is kept: the adapters (LoRA) and the head, never the base's embedding.
    assert not any("embed" in k for k in kept) and any("head" in k for k in kept)
    assert any("lora_A" in k for k in kept) == (trainable == "lora")
    for name in kept:
        assert torch.equal(got.tensors[name], want.tensors[name]), f"{name} differs"

    w = read_latest(reference, reference.topic_models, public, "m")
    g = read_latest(crashed, crashed.topic_models, public, "m")
    assert g.manifest.input_offsets == w.manifest.input_offsets, tail
    for name in set(w.tensors) & set(g.tensors):  # a delta holds a subset of a full version's tensors
        assert torch.equal(g.tensors[name], w.tensors[name]), f"published {name} differs"
    crashed_manifests = manifests(crashed)
    versions = [m.version for m in crashed_manifests]
    assert versions == list(range(1, len(versions) + 1)), versions
    layouts = {m.layout.delta for m in crashed_manifests if m.layout is not None}
    assert layouts == {True, False}, layouts  # both deltas and full versions were published and survived
    print(f"{trainable}: {KILLS} kills, versions 1..{versions[-1]}, state tensors equal: {len(kept)}")
