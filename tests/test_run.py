"""``stream-learner run`` as a real process on the real servers, its joiner in a child process
(``run_joiner_process``, the default) or a thread: it learns, stops cleanly on SIGTERM, its joiner
process follows the parent's death, and a dead joiner process stops the trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest

from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings

from .join.helpers import advance_all, label, oracle_joiner, prediction, produce
from .procs import children, free_port_pair, settings_env

N = 600
T0 = 1_767_225_600_000


def run_settings(settings: Settings, keys, tmp_path: Path, **overrides) -> Settings:
    s = oracle_joiner(
        msgspec.structs.replace(
            settings,
            trainer_model="m",
            trainer_features=["x"],
            trainer_classes=["a", "b"],
            trainer_hidden=[8],
            trainer_signing_key=str(keys[0]),
            trainer_state_dir=str(tmp_path / "state"),
            trainer_checkpoint_every_examples=200,
            trainer_checkpoint_every_s=2.0,
            trainer_group_id=f"{settings.topic_examples}-trainer",
            metrics_port=free_port_pair(),
            log_format="json",
        ),
        1_000,
        "run",
    )
    return msgspec.structs.replace(s, **overrides)


def feed(s: Settings) -> None:
    """``N`` labeled predictions, then the watermark past their windows on every partition."""
    events = []
    for i in range(N):
        events += [prediction(i, T0 + i), label(i, T0 + i + 5, "ab"[i % 2])]
    produce(s, events)
    advance_all(s, T0 + N + 10_000, partitions=s.partitions_input)


def start(s: Settings, log: Path) -> subprocess.Popen:
    env = {**settings_env(s), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "run"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def joiner_pid(proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"joiner_process_started"' in line:
                return int(json.loads(line)["pid"])
        assert proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    raise AssertionError("no joiner process started")


def wait_learned(s: Settings, keys, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    public = load_public_key(keys[1])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            latest = read_latest(s, s.topic_models, public, "m", timeout_s=5)
        except Exception:
            time.sleep(0.5)
            continue
        if latest.manifest.counts["labeled"] >= N:
            return
        time.sleep(0.5)
    raise AssertionError(f"run did not learn {N} examples: {log.read_text()[-2000:]}")


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


@pytest.mark.slow
@pytest.mark.parametrize("process", [True, False], ids=["joiner-process", "joiner-thread"])
def test_run_learns_and_stops_cleanly_on_sigterm(settings: Settings, keys, tmp_path: Path, process: bool) -> None:
    s = run_settings(settings, keys, tmp_path, run_joiner_process=process)
    feed(s)
    log = tmp_path / "run.log"
    proc = start(s, log)
    try:
        child = joiner_pid(proc, log) if process else None
        wait_learned(s, keys, proc, log)
        parent = health(s.metrics_port)
        assert parent["roles"]["joiner"]["healthy"] and parent["roles"]["trainer"]["healthy"], parent
        if process:
            assert child in children(proc.pid)
            own = health(s.metrics_port + 1)  # the joiner process's own /health, with its progress
            assert set(own["roles"]) == {"joiner"} and own["roles"]["joiner"]["healthy"], own
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    assert status == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert '"trainer_stopped"' in text and '"joiner_stopped"' in text
    if child is not None:
        assert not alive(child)


@pytest.mark.slow
def test_the_joiner_process_stops_when_run_is_killed(settings: Settings, keys, tmp_path: Path) -> None:
    s = run_settings(settings, keys, tmp_path)
    log = tmp_path / "run.log"
    proc = start(s, log)
    child = joiner_pid(proc, log)
    time.sleep(1.0)
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 40  # it stops at once; it exits regardless 30 s after the parent died
    while time.monotonic() < deadline and alive(child):
        time.sleep(0.2)
    assert not alive(child), "the joiner process outlived its parent"
    assert '"joiner_stopped"' in log.read_text()  # stopped, not cut off by the 30 s exit


@pytest.mark.slow
def test_a_dead_joiner_process_stops_run_with_an_error(settings: Settings, keys, tmp_path: Path) -> None:
    s = run_settings(settings, keys, tmp_path)
    log = tmp_path / "run.log"
    proc = start(s, log)
    try:
        child = joiner_pid(proc, log)
        time.sleep(1.0)
        os.kill(child, signal.SIGKILL)
        status = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 1, log.read_text()[-2000:]
    assert '"joiner_process_failed"' in log.read_text()
