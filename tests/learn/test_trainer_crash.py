"""Crash test: a trainer SIGKILLed at random moments ends bit-identical to one that never stopped.

100,000 examples on one examples partition (Agrawal, 20% unlabeled, 1% of
them repeated as the joiner's at-least-once delivery would). A reference
trainer runs uninterrupted, in this process. A real ``stream-learner trainer``
process is SIGKILLed at seeded random moments at least ``KILLS`` times and
restarted each time, then runs until it has applied everything. The last
checkpoints of both must hold bit-identical weights and the same counts, and
the crashed run's published versions must have no gaps and no repeats.
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

from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.events import MANIFEST

from ..procs import read_topic, settings_env, train_uninterrupted
from .streams import agrawal_examples
from .test_trainer import produce_examples

#: Run with both Kafka clients, and the batch examples format on kafka-python (tests/conftest.py).
pytestmark = [pytest.mark.both_transports, pytest.mark.both_formats]

N = 100_000
KILLS = 10
SEED = 7


def stream() -> list:
    examples = agrawal_examples(N, unlabeled=0.2, seed=SEED)
    rng = random.Random(SEED)
    out = []
    for ex in examples:
        out.append(ex)
        if rng.random() < 0.01:
            out.append(ex)  # a duplicate, as the joiner may emit after a crash
    return out


def manifests(settings: Settings) -> list:
    return [
        MANIFEST.decode(r.value)
        for r in read_topic(settings, settings.topic_models)
        if dict(r.headers).get("sl-type") == b"manifest"
    ]


def applied_once(counts: dict[str, int]) -> dict[str, int]:
    """The counts that say every example was applied exactly once, whatever the timing (README, the trainer)."""
    return {
        "labeled": counts["labeled"],
        "late": counts["late"],
        "duplicates": counts["duplicates"],
        # unlabeled examples learned as pseudo-labels or skipped below the threshold, other models, rejected
        "other": counts["pseudo"] + counts["skipped"] - counts["duplicates"],
    }


@pytest.mark.slow
def test_sigkilled_trainer_matches_an_uninterrupted_one(tsettings: Settings, keys, tmp_path: Path) -> None:
    examples = stream()
    total = produce_examples(tsettings, examples, seed=SEED)  # records: fewer than examples in batches
    base = msgspec.structs.replace(
        tsettings, trainer_checkpoint_every_examples=5000, trainer_checkpoint_every_s=1.0, log_format="json"
    )

    reference = msgspec.structs.replace(base, trainer_model="m", trainer_state_dir=str(tmp_path / "ref"))
    train_uninterrupted(reference, total)

    # The crashed run learns the same stream under its own state and topic.
    crashed = msgspec.structs.replace(
        base, trainer_state_dir=str(tmp_path / "crashed"), topic_models=base.topic_models + ".crashed"
    )
    from stream_learner.bus import ensure_topics

    ensure_topics(crashed)
    env = settings_env(crashed)
    log = (tmp_path / "trainer.log").open("w")
    rng = random.Random(SEED)
    cmd = [sys.executable, "-m", "stream_learner.cli", "trainer"]
    for _ in range(KILLS):
        proc = subprocess.Popen(cmd, env=env, stderr=log)
        time.sleep(rng.uniform(1.0, 4.0))
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
            except Exception:
                continue
            if latest.manifest.input_offsets[0].offset == total:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    log.close()
    tail = (tmp_path / "trainer.log").read_text()[-3000:]

    want = read_latest(reference, reference.topic_models, public, "m")
    got = read_latest(crashed, crashed.topic_models, public, "m")
    assert got.manifest.input_offsets[0].offset == total, tail
    # Every example applied exactly once: the same counts as the uninterrupted run.
    assert got.manifest.counts == want.manifest.counts, tail
    assert want.manifest.counts["duplicates"] == len(examples) - N
    assert set(got.tensors) == set(want.tensors)
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), f"{name} differs"
    assert got.manifest.weights.sha256 == want.manifest.weights.sha256
    versions = [m.version for m in manifests(crashed)]
    assert versions == list(range(1, len(versions) + 1)), versions
    print(f"crashed run: {KILLS} kills, versions 1..{versions[-1]}, reference versions 1..{want.manifest.version}")
