"""The student survives SIGKILLs: a trainer process with the student on, killed 10 times, ends with the
student's state (model and optimizer) bit-identical to an uninterrupted trainer's."""

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

from ..learn.streams import agrawal_examples
from ..learn.test_trainer import produce_examples
from ..procs import settings_env, train_uninterrupted

N = 40_000
KILLS = 10
SEED = 11


@pytest.mark.slow
def test_a_sigkilled_trainer_ends_with_the_uninterrupted_student(vsettings: Settings, keys, tmp_path: Path) -> None:
    produce_examples(vsettings, agrawal_examples(N, unlabeled=0.2, seed=SEED))
    base = msgspec.structs.replace(
        vsettings,
        trainer_variants=["student"],
        trainer_checkpoint_every_examples=4000,
        trainer_checkpoint_every_s=1.0,
        trainer_hidden=[16],
        trainer_student_hidden=[],
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
        time.sleep(rng.uniform(1.5, 4.0))
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
    student = sorted(k for k in want.tensors if k.startswith("student."))
    assert student and student == sorted(k for k in got.tensors if k.startswith("student.")), tail
    for name in student + ["recent.raw", "recent.labels"]:
        assert torch.equal(got.tensors[name].nan_to_num(), want.tensors[name].nan_to_num()), name
    assert got.meta["learner"]["student_steps"] == want.meta["learner"]["student_steps"]
    print(f"{KILLS} kills; student steps {want.meta['learner']['student_steps']}, tensors equal: {len(student)}")
