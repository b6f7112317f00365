"""The data-parallel trainer (stream_learner.learn.ranks) as real processes on the real servers.

The same stream, with the joiner's duplicates, is laid out twice: on one
examples partition, and on two, where each global chunk of 32 is 16 examples
of partition 0 followed by 16 of partition 1 (each rank's share). So a
1-rank trainer over the first topic and a 2-rank trainer (two gloo
processes, ``stream-learner trainer --trainer-dist-world-size 2``) over the
second learn the same chunks with the same global batch:

* their weights agree within float tolerance (the gradient of a batch is
  summed from two halves: another reduction order), their counts exactly;
* a 2-rank trainer SIGKILLed ten times (rank 0, rank 1, both) ends
  bit-identical to an unkilled 2-rank run (the all-reduce of two ranks is one
  addition, which commutes), every example trained once (counts exact), and
  its versions have no gaps and no repeats;
* a partition that runs dry does not stall the other rank, SIGTERM stops the
  group cleanly, and more ranks than partitions fail at once, before any rank
  starts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import torch

from stream_learner.bus import ensure_topics, make_producer
from stream_learner.checkpoint.reader import LoadedCheckpoint, read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.events import encode
from stream_learner.events.batch import BATCH_HEADERS, encode_batch
from stream_learner.learn.build import state_store

from ..procs import children, settings_env, train_uninterrupted
from .streams import agrawal_examples
from .test_trainer_crash import applied_once, manifests

BATCH = 32
KILLS = 10
SEED = 11


def stream(n: int) -> list:
    """``n`` Agrawal examples, 20 % unlabeled, about 1 % repeated, cut to whole global chunks."""
    rng = random.Random(SEED)
    out = []
    for ex in agrawal_examples(n, unlabeled=0.2, seed=SEED):
        out.append(ex)
        if rng.random() < 0.01:
            out.append(ex)
    return out[: len(out) // BATCH * BATCH]


def produce(settings: Settings, examples: list, partitions: int) -> int:
    """Chunk by chunk, share ``r`` of each chunk of ``BATCH`` to partition ``r``; the records written.

    In the batch examples format each partition's examples go in records of 1 to 300 (seeded), so a
    rank's share of a global chunk often ends inside a batch record.
    """
    producer = make_producer(settings)
    share = BATCH // partitions
    if settings.examples_format == "batch":
        rng, records = random.Random(SEED), 0
        for p in range(partitions):
            values = [encode(ex) for i, ex in enumerate(examples) if i % BATCH // share == p]
            start = 0
            while start < len(values):
                end = start + rng.randint(1, 300)
                batch = encode_batch(values[start:end])
                producer.send(settings.topic_examples, value=batch, partition=p, headers=BATCH_HEADERS)
                start, records = end, records + 1
    else:
        for i, ex in enumerate(examples):
            producer.send(
                settings.topic_examples, key=ex.request_id.encode(), value=encode(ex), partition=i % BATCH // share
            )
        records = len(examples)
    producer.flush()
    producer.close()
    return records


def on_topic(tsettings: Settings, tmp_path: Path, name: str, partitions: int, **overrides) -> Settings:
    s = msgspec.structs.replace(
        tsettings,
        topic_examples=f"{tsettings.topic_examples}.{name}",
        topic_models=f"{tsettings.topic_models}.{name}",
        partitions_examples=partitions,
        trainer_state_dir=str(tmp_path / name),
        trainer_checkpoint_every_examples=2000,
        trainer_checkpoint_every_s=1.0,
        log_format="json",
        **overrides,
    )
    ensure_topics(s)
    return s


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def ranks(launcher: subprocess.Popen, world: int, timeout_s: float = 60) -> dict[int, int]:
    """Rank -> pid of the launcher's rank processes, once all ``world`` run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {r: p for p in children(launcher.pid) if (r := rank_of(p)) is not None}
        if len(found) == world:
            return found
        time.sleep(0.1)
    raise AssertionError(f"the launcher did not start {world} ranks")


def launch(s: Settings, log) -> subprocess.Popen:
    # Unbuffered: a SIGKILLed rank's log lines are not lost.
    env = {**settings_env(s), "STREAM_LEARNER_TRAINER_DIST_WORLD_SIZE": "2", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "stream_learner.cli", "trainer"]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)


def wait_for_log(path: Path, line: str, count: int, timeout_s: float = 120) -> None:
    """Until ``path`` holds ``count`` lines with ``line``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.read_text().count(line) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} lines with {line} never came to {path}")


def wait_for_all(s: Settings, total: int, public, proc: subprocess.Popen, timeout_s: float = 240) -> LoadedCheckpoint:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1.0)
        try:
            latest = read_latest(s, s.topic_models, public, "m", timeout_s=10)
        except Exception:
            continue
        if sum(x.offset for x in latest.manifest.input_offsets) == total:
            return latest
    raise AssertionError(f"the trainer did not learn all {total} examples (exit {proc.poll()})")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def two_ranks(s: Settings, total: int, keys, log_path: Path) -> LoadedCheckpoint:
    """An unkilled 2-rank run to its end: its last checkpoint."""
    with log_path.open("w") as log:
        proc = launch(s, log)
        try:
            latest = wait_for_all(s, total, load_public_key(keys[1]), proc)
        finally:
            stop(proc)
    return latest


def lay_out(tsettings: Settings, tmp_path: Path, n: int, partitions: tuple[int, ...]) -> tuple[list, list[Settings]]:
    """The stream of about ``n`` examples on topics of each number of ``partitions`` (one share each)."""
    examples, counted = lay_out_counted(tsettings, tmp_path, n, partitions)
    return examples, [s for s, _ in counted]


def lay_out_counted(
    tsettings: Settings, tmp_path: Path, n: int, partitions: tuple[int, ...]
) -> tuple[list, list[tuple[Settings, int]]]:
    """:func:`lay_out`, with the records each topic holds."""
    examples = stream(n)
    topics = [on_topic(tsettings, tmp_path, f"p{p}", p) for p in partitions]
    return examples, [(s, produce(s, examples, p)) for s, p in zip(topics, partitions, strict=True)]


@pytest.mark.slow
@pytest.mark.both_formats
def test_two_ranks_learn_what_one_process_learns_from_the_same_global_batches(
    tsettings: Settings, keys, tmp_path: Path
) -> None:
    examples, ((one, records_one), (two, records_two)) = lay_out_counted(tsettings, tmp_path, 40_000, (1, 2))
    total = len(examples)
    train_uninterrupted(one, records_one)
    public = load_public_key(keys[1])
    want = read_latest(one, one.topic_models, public, "m")
    got = two_ranks(two, records_two, keys, tmp_path / "two.log")
    assert got.manifest.counts == want.manifest.counts
    assert want.manifest.counts["duplicates"] == total - len({ex.example_id for ex in examples})
    assert set(got.tensors) == set(want.tensors)
    worst = max(float((got.tensors[k] - t).abs().max()) for k, t in want.tensors.items())
    print(f"\n{total} examples, {want.manifest.counts['batches']} batches: largest weight difference {worst:.2e}")
    for name, tensor in want.tensors.items():
        assert torch.allclose(got.tensors[name], tensor, rtol=1e-4, atol=1e-5), f"{name} differs"


@pytest.mark.slow
def test_a_two_rank_trainer_killed_ten_times_ends_bit_identical_to_an_unkilled_one(
    tsettings: Settings, keys, tmp_path: Path
) -> None:
    # Long enough that every kill comes mid-stream (a restart takes ~3 s here, the ranks learn ~4k/s).
    examples, (two,) = lay_out(tsettings, tmp_path, 120_000, (2,))
    total = len(examples)
    want = two_ranks(two, total, keys, tmp_path / "unkilled.log")

    killed = msgspec.structs.replace(
        two, trainer_state_dir=str(tmp_path / "killed"), topic_models=two.topic_models + ".killed"
    )
    ensure_topics(killed)
    public = load_public_key(keys[1])
    rng = random.Random(SEED)
    victims = ["rank 0", "rank 1", "both"]
    store = state_store(killed)
    learned: list[int] = []  # examples in the saved state at each kill
    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log:
        proc = launch(killed, log)
        try:
            for k in range(KILLS):
                # Both ranks of this attempt started (torch, the rendezvous, the restore), then learn a while.
                wait_for_log(log_path, '"event": "trainer_started"', 2 * (k + 1))
                time.sleep(rng.uniform(0.2, 1.2))
                pids = ranks(proc, 2)
                saved = store.load()
                learned.append(0 if saved is None else sum(saved.meta["position"].values()))
                victim = victims[k % 3]
                for r in (0, 1) if victim == "both" else (int(victim[-1]),):
                    os.kill(pids[r], signal.SIGKILL)
                # The agent restarts the whole group: wait until the killed ranks' group is gone.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and set(pids.values()) & set(children(proc.pid)):
                    time.sleep(0.1)
            got = wait_for_all(killed, total, public, proc)
        finally:
            stop(proc)
    tail = log_path.read_text()[-3000:]
    assert got.manifest.counts == want.manifest.counts, tail
    assert applied_once(got.manifest.counts) == applied_once(want.manifest.counts)
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), f"{name} differs"
    assert got.manifest.weights.sha256 == want.manifest.weights.sha256
    versions = [m.version for m in manifests(killed)]
    assert versions == list(range(1, len(versions) + 1)), versions
    print(f"\nkilled run: {KILLS} kills, versions 1..{versions[-1]}; unkilled: 1..{want.manifest.version}")
    print(f"examples in the saved state at each kill: {learned} of {total}")
    assert learned[-1] < total and learned == sorted(learned), "the kills were not all mid-stream"


@pytest.mark.slow
def test_a_partition_that_runs_dry_does_not_stall_the_other_and_sigterm_stops_the_group(
    tsettings: Settings, keys, tmp_path: Path
) -> None:
    s = on_topic(tsettings, tmp_path, "dry", 2)
    examples = agrawal_examples(3_200, seed=SEED)
    producer = make_producer(s)
    for i, ex in enumerate(examples):  # partition 1 holds 200, partition 0 the rest
        producer.send(s.topic_examples, key=ex.request_id.encode(), value=encode(ex), partition=int(i >= 3_000))
    producer.flush()
    producer.close()
    log_path = tmp_path / "dry.log"
    with log_path.open("w") as log:
        proc = launch(s, log)
        latest = wait_for_all(s, len(examples), load_public_key(keys[1]), proc)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    stopped = time.monotonic() - began
    offsets = {x.partition: x.offset for x in latest.manifest.input_offsets}
    assert offsets == {0: 3_000, 1: 200}
    assert latest.manifest.counts["labeled"] == len(examples)
    assert status == 0, log_path.read_text()[-3000:]
    assert log_path.read_text().count('"event": "trainer_stopped"') == 2  # both ranks closed, not killed
    print(f"\nstopped in {stopped:.1f} s")


@pytest.mark.slow
def test_more_ranks_than_partitions_fail_at_once_with_a_clear_error(tsettings: Settings, tmp_path: Path) -> None:
    s = on_topic(tsettings, tmp_path, "few", 2)
    env = {**settings_env(s), "STREAM_LEARNER_TRAINER_DIST_WORLD_SIZE": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli", "trainer"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "3 trainer ranks for 2 partitions" in done.stdout + done.stderr
