"""The retry helper: what is transient, what is permanent, and that a stop ends a wait at once."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import redis
import torch
from kafka import errors as kafka_errors

from stream_learner.checkpoint.state import RetryingStateStore, Snapshot
from stream_learner.config import Settings
from stream_learner.local import LocalServers, free_port
from stream_learner.util.backoff import Backoff
from stream_learner.util.retry import Retry, Stopped, is_transient

from .procs import settings_env


def wrapped(outer: Exception, inner: BaseException) -> Exception:
    """``outer`` raised while handling ``inner``, as redis-py raises ConnectionError over an OSError."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - implicit chaining is what redis-py does
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (redis.ConnectionError("Error 111 connecting. Connection refused."), True),
        (redis.TimeoutError("Timeout reading from socket"), True),
        (redis.BusyLoadingError("Redis is loading the dataset in memory"), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.exceptions.TryAgainError("TRYAGAIN"), True),
        (redis.exceptions.MasterDownError("MASTERDOWN"), True),
        (redis.AuthenticationError("WRONGPASS invalid username-password pair"), False),
        (redis.exceptions.NoPermissionError("NOPERM this user has no permissions"), False),
        (
            wrapped(
                redis.ConnectionError("Error 1 connecting"), ssl.SSLCertVerificationError("certificate verify failed")
            ),
            False,
        ),
        (wrapped(redis.ConnectionError("Error connecting"), ssl.SSLError("WRONG_VERSION_NUMBER")), False),
        (wrapped(redis.ConnectionError("Connection closed"), ssl.SSLEOFError("EOF occurred")), True),
        (redis.ResponseError("ERR unknown command"), False),
        (kafka_errors.KafkaTimeoutError("Failed to update metadata"), True),
        (kafka_errors.KafkaConnectionError("Connection refused"), True),
        (kafka_errors.NotLeaderForPartitionError(), True),
        (kafka_errors.BrokerNotAvailableError(), True),
        (kafka_errors.SaslAuthenticationFailedError(), False),
        (kafka_errors.TopicAuthorizationFailedError(), False),
        (kafka_errors.MessageSizeTooLargeError(), False),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (PermissionError(13, "Permission denied"), False),
        (ValueError("a bug"), False),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else str(x),
)
def test_transient_or_permanent(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_a_real_wrong_password_and_a_missing_acl_are_permanent(servers: LocalServers) -> None:
    admin = redis.Redis.from_url(servers.redis_url)
    user = f"retry-{uuid.uuid4().hex[:8]}"
    admin.execute_command("ACL", "SETUSER", user, "on", ">secret", "~*", "+ping", "+hello", "+client")
    try:
        wrong = redis.Redis.from_url(servers.redis_url, username=user, password="not-the-secret")
        with pytest.raises(redis.RedisError) as refused:
            wrong.ping()
        wrong.close()
        assert not is_transient(refused.value), repr(refused.value)
        limited = redis.Redis.from_url(servers.redis_url, username=user, password="secret")
        assert limited.ping()
        with pytest.raises(redis.RedisError) as forbidden:
            limited.set("k", "v")
        limited.close()
        assert not is_transient(forbidden.value), repr(forbidden.value)
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


class FlakyStore:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.saved: list[Snapshot] = []

    def save(self, snapshot: Snapshot) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.saved.append(snapshot)

    def load(self) -> Snapshot | None:
        if self.failures:
            raise self.failures.pop(0)
        return self.saved[-1] if self.saved else None


def quiet(exc: BaseException, delay: float) -> None:
    pass


def test_a_retrying_store_waits_out_transient_errors_and_raises_permanent_ones() -> None:
    snap = Snapshot({"w": torch.ones(1)}, {"v": 1})
    inner = FlakyStore([redis.ConnectionError("down"), redis.BusyLoadingError("loading")])
    store = RetryingStateStore(inner, Retry("redis", backoff=Backoff(0.001, 0.001), on_retry=quiet))
    store.save(snap)
    assert inner.saved == [snap] and store.load() is snap
    inner.failures = [redis.AuthenticationError("WRONGPASS")]
    with pytest.raises(redis.AuthenticationError):
        store.load()


def test_a_stop_ends_the_wait_at_once() -> None:
    stop = threading.Event()
    inner = FlakyStore([redis.ConnectionError("down")] * 10_000)
    store = RetryingStateStore(inner, Retry("redis", stop=stop, backoff=Backoff(30.0, 30.0), on_retry=quiet))
    threading.Timer(0.3, stop.set).start()
    began = time.monotonic()
    with pytest.raises(Stopped):
        store.save(Snapshot({}, {}))
    assert time.monotonic() - began < 5


@pytest.mark.slow
def test_a_trainer_started_while_redis_is_down_waits_and_stops_cleanly(
    settings: Settings, keys, tmp_path: Path
) -> None:
    s = msgspec.structs.replace(
        settings,
        trainer_state_store="redis",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        trainer_features=["x"],
        trainer_signing_key=str(keys[0]),
        log_format="json",
    )
    log = tmp_path / "trainer.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "trainer"], env=settings_env(s), stderr=log.open("w")
    )
    try:
        deadline = time.monotonic() + 60
        while '"trainer_dependency_unavailable"' not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-2000:]  # waiting, not exited
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
    assert code == 0, log.read_text()[-2000:]
    assert '"trainer_stopped_before_start"' in log.read_text()
