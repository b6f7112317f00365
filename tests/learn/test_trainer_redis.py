"""A trainer on the Redis state store rides out Valkey outages: it waits, it never exits, and counts stay exact.

A real ``stream-learner trainer`` process (``trainer_state_store=redis``,
a checkpoint every second) is started while Valkey is down, then learns a
trickle of 20,000 examples (20% unlabeled, 1% repeated as the joiner's
at-least-once delivery would) while Valkey is SIGKILLed twice and started
again. The process must never exit, and its last checkpoint must hold the
counts of a trainer that never saw an outage: every example applied exactly
once (the README's trainer section says which counts are exact while
examples trickle in; the weights then depend on timing).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import redis

from stream_learner.bus import ensure_topics
from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.learn.trainer import Trainer
from stream_learner.local import LocalServers

from ..join.test_redis_restart import redis_running, stop_valkey
from ..procs import settings_env
from .streams import agrawal_examples
from .test_trainer import produce_examples
from .test_trainer_crash import applied_once, manifests

N = 20_000
SEED = 23


def stream() -> list:
    rng = random.Random(SEED)
    out = []
    for ex in agrawal_examples(N, unlabeled=0.2, seed=SEED):
        out.append(ex)
        if rng.random() < 0.01:
            out.append(ex)
    return out


@pytest.mark.slow
def test_a_trainer_on_the_redis_state_store_survives_valkey_sigkills(
    tsettings: Settings, servers: LocalServers, keys, tmp_path: Path
) -> None:
    examples = stream()
    total = len(examples)
    base = msgspec.structs.replace(
        tsettings, trainer_checkpoint_every_examples=2000, trainer_checkpoint_every_s=1.0, log_format="json"
    )
    # The reference: every example at once, a directory state store, no outage.
    produce_examples(base, examples)
    reference = Trainer(msgspec.structs.replace(base, trainer_state_dir=str(tmp_path / "ref")))
    try:
        while sum(reference.offsets.values()) < total or reference.buffer:
            reference.step()
        reference.checkpoint()
    finally:
        reference.close()
    want = reference.published[-1].counts

    # The run under test learns the same examples, written again as a trickle, from its own topics.
    s = msgspec.structs.replace(
        base,
        trainer_state_store="redis",
        topic_examples=base.topic_examples + ".r",
        topic_models=base.topic_models + ".r",
    )
    ensure_topics(s)
    client = redis.Redis.from_url(s.redis_url)
    client.delete(f"sl:trainer:{s.trainer_model}:state")
    client.close()
    log = tmp_path / "trainer.log"
    cmd = [sys.executable, "-m", "stream_learner.cli", "trainer"]
    proc = None
    outages: list[float] = []
    try:
        stop_valkey(servers, "sigkill")
        proc = subprocess.Popen(cmd, env=settings_env(s), stderr=log.open("w"))
        time.sleep(4)  # started while Valkey is down: it waits for its state
        assert proc.poll() is None, log.read_text()[-2000:]
        servers.start_redis()

        def trickle() -> None:
            for k in range(0, total, 500):
                produce_examples(s, examples[k : k + 500])
                time.sleep(0.5)

        producer = threading.Thread(target=trickle, daemon=True)
        producer.start()
        for _ in range(2):
            time.sleep(5)
            stop_valkey(servers, "sigkill")  # checkpoints come due while it is down
            began = time.monotonic()
            time.sleep(3)
            assert proc.poll() is None, log.read_text()[-2000:]
            servers.start_redis()
            outages.append(time.monotonic() - began)
        producer.join(60)
        public = load_public_key(keys[1])
        deadline = time.monotonic() + 120
        got = None
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                got = read_latest(s, s.topic_models, public, "m", timeout_s=10)
            except Exception:
                continue
            if got.manifest.input_offsets[0].offset == total:
                break
        alive = proc.poll() is None
    finally:
        if not redis_running(servers):
            servers.start_redis()  # other tests share this Valkey
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    text = log.read_text()
    assert alive and proc.returncode == 0, text[-3000:]
    assert got is not None and got.manifest.input_offsets[0].offset == total, text[-3000:]
    # Every example applied exactly once across the outages (what the README says is exact live:
    # the split of unlabeled examples into pseudo-labeled and skipped depends on where partial chunks fell).
    assert applied_once(got.manifest.counts) == applied_once(want)
    versions = [m.version for m in manifests(s)]
    assert versions == list(range(1, len(versions) + 1)), versions
    waits = [json.loads(line) for line in text.splitlines() if '"trainer_dependency_unavailable"' in line]
    assert len(waits) >= 3 and {w["dependency"] for w in waits} == {"redis"}
    print(
        f"\ntrainer on redis: {total} examples, Valkey down at start and {len(outages)} times "
        f"({', '.join(f'{d:.1f}s' for d in outages)}), {len(waits)} waits logged, versions 1..{versions[-1]}"
    )
