"""The live trainer process and an examples replay run one learning session: the same result.

A real ``stream-learner trainer`` process learns a stream of examples from
the examples topic; a replay of that topic's range (``source="examples"``)
learns it again into its own lineage. Checkpoints fall where the stream
puts them (every ``trainer_checkpoint_every_examples``, or a drift policy's
checkpoint action; never the clock here), so every version must match: the
same weights bit for bit and the same counts.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.events import MANIFEST

from ..learn.streams import AGRAWAL_FEATURES, agrawal_examples
from ..learn.test_trainer import produce_examples
from ..procs import read_topic, settings_env
from .test_replay import replay

# A multiple of batch 32 x 16 chunks: the last example ends a chunk and a checkpoint (every 512).
N = 5 * 512


@pytest.mark.slow
@pytest.mark.both_transports
def test_a_trainer_process_and_an_examples_replay_publish_the_same_versions(rsettings: Settings) -> None:
    s = msgspec.structs.replace(
        rsettings,
        trainer_features=AGRAWAL_FEATURES,
        trainer_classes=["0", "1"],
        trainer_checkpoint_every_examples=500,
        log_format="json",
    )
    produce_examples(s, agrawal_examples(N, unlabeled=0.2, seed=5))
    public = load_public_key(Path(s.trainer_signing_key).with_suffix(".pub.pem"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "trainer"], env=settings_env(s), stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                if read_latest(s, s.topic_models, public, "m", timeout_s=5).manifest.input_offsets[0].offset == N:
                    break
            except Exception:
                continue
        else:
            raise AssertionError("the trainer process did not publish a version covering every example")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    live = {
        m.version: m
        for m in (
            MANIFEST.decode(r.value)
            for r in read_topic(s, s.topic_models)
            if dict(r.headers).get("sl-type") == b"manifest"
        )
        if m.model == "m"
    }

    _, got = replay(s, "same", source="examples")
    assert got["done"] and got["counts"]["examples"] == N
    assert sorted(live) == [e["version"] for e in got["published"]] == list(range(1, len(live) + 1))
    mine = {
        m.version: m
        for m in (
            MANIFEST.decode(r.value)
            for r in read_topic(s, s.topic_models)
            if dict(r.headers).get("sl-type") == b"manifest"
        )
        if m.model == "m@replay-same"
    }
    for entry in got["published"]:
        v = entry["version"]
        assert entry["sha256_as_live"] == live[v].weights.sha256, f"v{v}: weights differ"
        assert mine[v].counts == live[v].counts, f"v{v}: counts differ"
        assert mine[v].input_offsets == live[v].input_offsets
        assert mine[v].drift_state == live[v].drift_state
