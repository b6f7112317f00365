"""`stream-learner replay` as a real process: Ctrl-C (SIGINT) stops it resumably, the same command
resumes it, and it ends with the digests of an uninterrupted replay."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from stream_learner.config import Settings

from ..join.test_crash import generate, produce_raw
from ..procs import settings_env
from .test_replay import replay


def wait_for_checkpoints(proc: subprocess.Popen[bytes], log_path: Path, n: int, timeout_s: float = 120) -> None:
    """Until the running replay has logged ``n`` checkpoints (it must not end or take too long first)."""
    deadline = time.monotonic() + timeout_s
    while log_path.read_text().count("replay_checkpoint") < n:
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.01)


@pytest.mark.slow
def test_sigint_then_the_same_command_resumes_to_the_uninterrupted_result(rsettings: Settings, tmp_path: Path) -> None:
    s = msgspec.structs.replace(rsettings, trainer_checkpoint_every_examples=1000, log_format="json")
    stream = generate(10_000, seed=5)
    produce_raw(s, stream)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "stream_learner.cli",
        "replay",
        "--lineage",
        "m@cli",
        "--output-dir",
        str(out),
        "--close-windows",
        "--replay-id",
        "cli",
    ]
    env = settings_env(s)
    log_path = tmp_path / "replay.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stderr=log, stdout=subprocess.PIPE)
        wait_for_checkpoints(proc, log_path, 1)
        proc.send_signal(signal.SIGINT)
        first_out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log_path.read_text()[-3000:]
    first = json.loads(first_out.decode().strip().splitlines()[-1])
    assert first["done"] is False and 0 < first["records_read"] < len(stream)

    with log_path.open("a") as log:
        second = subprocess.run(cmd, env=env, stderr=log, stdout=subprocess.PIPE, timeout=300)
    text = log_path.read_text()
    assert second.returncode == 0, text[-3000:]
    assert "replay_resumed" in text
    report = second.stdout.decode()
    assert "# Replay cli (events) vs live" in report

    summary = json.loads((Path(s.replay_state_dir) / "cli" / "summary.json").read_text())
    _, whole = replay(s, "whole", lineage="m@cli", output_dir=str(tmp_path / "whole"), close_windows=True)
    assert summary["done"] and summary["records_read"] == len(stream)
    assert summary["published"] == whole["published"]
    assert summary["learner_counts"] == whole["learner_counts"]
    assert (Path(s.replay_state_dir) / "cli" / "report.json").exists()


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_ends_with_the_uninterrupted_versions(
    rsettings: Settings, tmp_path: Path
) -> None:
    """A kill -9 leaves the state of the last checkpoint (saved before its publish) and Redis keys
    mid-join: the resumed run republishes what may be missing, rebuilds the join and ends the same."""
    s = msgspec.structs.replace(rsettings, trainer_checkpoint_every_examples=1000, log_format="json")
    produce_raw(s, generate(10_000, seed=6))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "stream_learner.cli",
        "replay",
        "--lineage",
        "m@k",
        "--output-dir",
        str(out),
        "--replay-id",
        "k",
        "--no-progress",
    ]
    env = settings_env(s)
    log_path = tmp_path / "replay.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stderr=log, stdout=subprocess.DEVNULL)
        wait_for_checkpoints(proc, log_path, 3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    state = (
        json.loads((Path(s.replay_state_dir) / "k" / "summary.json").read_text())
        if (Path(s.replay_state_dir) / "k" / "summary.json").exists()
        else None
    )
    assert state is None  # killed: no summary was written
    with log_path.open("a") as log:
        done = subprocess.run(cmd, env=env, stderr=log, stdout=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, log_path.read_text()[-3000:]
    assert "replay_resumed" in log_path.read_text()
    summary = json.loads((Path(s.replay_state_dir) / "k" / "summary.json").read_text())
    _, whole = replay(s, "whole", lineage="m@k", output_dir=str(tmp_path / "whole"))
    assert summary["done"] and summary["published"] == whole["published"]
    files = sorted(f.name for f in (out / "m@k").iterdir() if f.name.endswith(".manifest.json"))
    assert files == [f"v{v:08d}.manifest.json" for v in range(1, whole["version"] + 1)]
