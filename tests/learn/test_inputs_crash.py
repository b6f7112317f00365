"""Crash test with every kind of input: a SIGKILLed ``stream-learner trainer`` on a spec with a number, a
closed and a hashed category, a vector and a text ends bit-identical to one that never stopped: the
weights, the numeric statistics, the tokenizer it carries, and the counts (unknown categories included).
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
from stream_learner.config import Settings

from ..procs import settings_env, train_uninterrupted
from ..text_tokenizer import make_tokenizer
from .test_inputs import spec_strings, stream
from .test_trainer import produce_examples

N = 20_000
KILLS = 4
SEED = 11


@pytest.mark.slow
def test_a_sigkilled_trainer_with_every_kind_of_input_matches_an_uninterrupted_one(
    tsettings: Settings, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    base = msgspec.structs.replace(
        tsettings,
        trainer_features=spec_strings(tokenizer),
        trainer_classes=["no", "yes"],
        trainer_hidden=[8],
        trainer_checkpoint_every_examples=2000,
        trainer_checkpoint_every_s=1.0,
        log_format="json",
    )
    examples = stream(N)
    produce_examples(base, examples)

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
    log_path = tmp_path / "trainer.log"
    for _ in range(KILLS):
        # Killed while it learns: after it published a checkpoint of its own (a start takes seconds
        # on a loaded machine, and a kill before it restored anything would prove nothing), at a
        # random moment of the next second.
        published = log_path.read_text().count("checkpoint_published")
        restored = log_path.read_text().count('"trainer_restored"')
        proc = subprocess.Popen(cmd, env=env, stderr=log)
        # Restored first (a start takes long on a loaded machine: a kill before it would not count).
        deadline = time.monotonic() + 180
        while log_path.read_text().count('"trainer_restored"') == restored and time.monotonic() < deadline:
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while log_path.read_text().count("checkpoint_published") == published and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc = subprocess.Popen(cmd, env=env, stderr=log)
    public = load_public_key(keys[1])
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                latest = read_latest(crashed, crashed.topic_models, public, "m", timeout_s=10)
            except Exception:  # nothing published yet
                continue
            # Done once the last run has restored too (the killed runs may have learned everything).
            restored_all = log_path.read_text().count('"trainer_restored"') == KILLS + 1
            if latest.manifest.input_offsets[0].offset == N and restored_all:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    log.close()
    tail = log_path.read_text()[-3000:]

    want = read_latest(reference, reference.topic_models, public, "m")
    got = read_latest(crashed, crashed.topic_models, public, "m")
    assert got.manifest.input_offsets[0].offset == N, tail
    restarts = [line for line in log_path.read_text().splitlines() if '"trainer_restored"' in line]
    assert len(restarts) == KILLS + 1 and all('"version": 0,' not in line for line in restarts[1:]), restarts
    assert got.manifest.counts == want.manifest.counts, tail
    assert want.manifest.counts["unknown_categories"] == N // 4  # "platinum": counted, once each
    assert got.manifest.architecture == want.manifest.architecture
    assert set(got.tensors) == set(want.tensors) and "tokenizer.review" in want.tensors
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), f"{name} differs"
    assert got.manifest.weights.sha256 == want.manifest.weights.sha256
