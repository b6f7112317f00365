"""The joiner process stops when told and fails fast on a permanent error (issue: operations).

Before: a joiner whose Redis refused its password logged ``retry_in_s 5.0``
forever and ignored SIGTERM; one whose Redis was down ignored SIGTERM too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import redis

from stream_learner.config import Settings
from stream_learner.local import LocalServers, free_port

from ..procs import settings_env


def joiner(settings: Settings) -> subprocess.Popen[str]:
    s = msgspec.structs.replace(
        settings,
        log_format="json",
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        joiner_group_id=f"{settings.topic_predictions}-stop-joiner",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "joiner"],
        env=settings_env(s),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_a_wrong_redis_password_exits_at_once_with_one_clear_line(settings: Settings, tmp_path: Path) -> None:
    private = LocalServers(workdir=tmp_path / "valkey")
    private.start_redis()
    try:
        redis.Redis.from_url(private.redis_url).config_set("requirepass", "right")
        host_port = private.redis_url.removeprefix("redis://").split("/")[0]
        proc = joiner(msgspec.structs.replace(settings, redis_url=f"redis://:wrong@{host_port}/0"))
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the joiner was still running a minute after Redis refused its password") from None
    finally:
        private.stop()
    assert proc.returncode == 1, err[-2000:]
    # kafka-python's own "metadata refresh cancelled" while its clients close is not ours
    errors = [x for x in lines(err) if x.get("level") == "error" and not x.get("logger", "").startswith("kafka")]
    assert [x["event"] for x in errors] == ["permanent_error"], err[-2000:]
    assert errors[0]["error"].startswith(f"cannot authenticate to Redis at {host_port}")
    assert "wrong" not in err  # the password is never printed
    assert not [x for x in lines(err) if x["event"] == "joiner_dependency_unavailable"]  # not retried


@pytest.mark.slow
def test_a_joiner_waiting_for_a_redis_that_is_down_stops_on_sigterm(settings: Settings) -> None:
    proc = joiner(msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        # Wait until it is retrying (the first refusal logged), then ask it to stop.
        while not any("joiner_dependency_unavailable" in line for line in list(log)):
            assert time.monotonic() < deadline, "the joiner never reported Redis unavailable"
            assert proc.poll() is None, "".join(log)[-2000:]
            time.sleep(0.2)
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        took = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    err = "".join(log)
    assert proc.returncode == 0, err[-2000:]
    assert took < 10, f"took {took:.1f} s to stop"  # a wait slice is 0.5 s; the rest is closing the clients
    assert any(x["event"] == "joiner_stopped_while_waiting" for x in lines(err)), err[-2000:]


@pytest.mark.parametrize("error", ["RebalanceInProgressError", "CommitFailedError", "IllegalGenerationError"])
def test_a_commit_refused_by_a_rebalancing_group_does_not_stop_the_joiner(error: str) -> None:
    """Seen under load in a kill storm: the joiner exited on RebalanceInProgressError from its commit."""
    import types

    import kafka.errors

    from stream_learner.join.joiner import Joiner
    from stream_learner.metrics import Metrics

    def refuse(offsets: object) -> None:
        raise getattr(kafka.errors, error)()

    stub = types.SimpleNamespace(consumer=types.SimpleNamespace(commit=refuse), metrics=Metrics())
    Joiner._commit(stub, {}, retry=False)  # type: ignore[arg-type]  # logged, not raised
