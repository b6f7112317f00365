"""Metrics per role, and /health: a role is healthy while it makes progress."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stream_learner.config import Settings, settings_env
from stream_learner.health import Health
from stream_learner.local import LocalServers, free_port
from stream_learner.metrics import ROLES, Metrics


def families(metrics: Metrics) -> set[str]:
    return {m.name for m in metrics.registry.collect()}


def test_a_process_exports_the_families_of_its_roles_only() -> None:
    serving = families(Metrics(roles=["serving", "sdk"]))
    assert {
        "stream_learner_serving_model_version",
        "stream_learner_serving_request_seconds",
        "stream_learner_sdk_events",
    } <= serving
    assert not {n for n in serving if n.startswith(("stream_learner_joiner_", "stream_learner_trainer_"))}
    joiner = families(Metrics(roles=["joiner"]))
    assert "stream_learner_joiner_consumer_lag_records" in joiner and "stream_learner_dead_letters" in joiner
    assert not {
        n for n in joiner if n.startswith(("stream_learner_serving_", "stream_learner_trainer_", "stream_learner_sdk_"))
    }
    for names in (serving, joiner):  # every process: what it runs, and the process itself
        assert {
            "stream_learner_build",
            "process_cpu_seconds",
            "process_resident_memory_bytes",
            "python_gc_objects_collected",
        } <= names
    everything = families(Metrics())
    assert serving | joiner | families(Metrics(roles=["trainer"])) <= everything
    with pytest.raises(ValueError, match="unknown roles"):
        Metrics(roles=["jointer"])


def test_build_info_names_the_versions() -> None:
    m = Metrics(roles=[])
    sample = next(s for f in m.registry.collect() if f.name == "stream_learner_build" for s in f.samples)
    assert sample.value == 1 and sample.labels["version"] and sample.labels["python"].count(".") == 2


class FakeConsumer:
    """What RoleProgress reads of a bus consumer: positions, high watermarks, whether it is connected."""

    def __init__(self) -> None:
        self.positions = {("t", 0): 0}
        self.highwaters = {("t", 0): 0}
        self.connections = 1.0

    def assignment(self) -> set[Any]:
        return set(self.positions)

    def position(self, tp: Any, timeout_ms: int | None = None) -> int:
        return self.positions[tp]

    def highwater(self, tp: Any) -> int:
        return self.highwaters[tp]

    def connected(self) -> bool:
        return self.connections > 0


def test_a_role_is_healthy_while_it_reads_or_is_caught_up_and_connected() -> None:
    now = [0.0]
    health = Health(stall_s=10, clock=lambda: now[0])
    consumer, role = FakeConsumer(), health.role("joiner")
    assert health.status()[0] is False  # starting: no cycle done
    assert role.observe(consumer) == 0 and health.status()[0]  # caught up, connected
    # Records arrive and are read: progress while the positions move.
    tp = ("t", 0)
    for step in range(1, 5):
        now[0] += 8
        consumer.highwaters[tp] = 100 * step + 50
        consumer.positions[tp] = 100 * step
        assert role.observe(consumer) == 50
        assert health.status()[0], health.status()
    # The consumer is stuck: records unread, positions still. Unhealthy once past the bound.
    now[0] += 5
    role.observe(consumer)
    assert health.status()[0]
    now[0] += 6
    role.observe(consumer)
    healthy, body = health.status()
    assert not healthy and body["status"] == "unhealthy"
    assert body["roles"]["joiner"]["detail"].startswith("no progress for 11 s (last: 50 records unread, none read)")
    assert body["roles"]["joiner"]["unread_records"] == 50
    # It reads again: healthy at once.
    consumer.positions[tp] = consumer.highwaters[tp]
    role.observe(consumer)
    assert health.status()[0]


def test_a_caught_up_role_without_a_broker_connection_turns_unhealthy() -> None:
    now = [0.0]
    health = Health(stall_s=10, clock=lambda: now[0])
    consumer, role = FakeConsumer(), health.role("trainer")
    role.observe(consumer)
    consumer.connections = 0.0  # the brokers are gone; nothing unread as far as it knows
    now[0] += 11
    role.observe(consumer)
    healthy, body = health.status()
    assert not healthy and "no connection to any broker" in body["roles"]["trainer"]["detail"]


def test_a_role_whose_loop_stopped_reporting_turns_unhealthy_by_itself() -> None:
    now = [0.0]
    health = Health(stall_s=10, clock=lambda: now[0])
    health.role("trainer").observe(FakeConsumer())
    health.add_check("serving", lambda: (True, "serving m v3"))
    now[0] += 9.9
    assert health.status()[0]
    now[0] += 0.2  # e.g. blocked in a retry while Redis is down: no cycle ends, no report
    healthy, body = health.status()
    assert not healthy and body["roles"]["serving"] == {"healthy": True, "detail": "serving m v3"}


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_the_metrics_port_serves_metrics_and_health() -> None:
    now = [0.0]
    metrics = Metrics(roles=["joiner"], health=Health(stall_s=5, clock=lambda: now[0]))
    port = free_port()
    metrics.health.expect("joiner")
    server = metrics.serve(port, addr="127.0.0.1")
    try:
        status, body = get(port, "/health")
        assert status == 503 and json.loads(body)["roles"]["joiner"]["detail"] == "starting"
        metrics.observe_consumer("joiner", FakeConsumer())
        status, body = get(port, "/health")
        assert status == 200 and json.loads(body)["roles"]["joiner"]["detail"] == "caught up"
        status, text = get(port, "/metrics")
        assert status == 200 and "stream_learner_joiner_consumer_lag_records 0.0" in text
        assert get(port, "/nope")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_joiner_whose_redis_is_down_reports_unhealthy_then_healthy_when_it_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    # A Valkey of its own, stopped and started again (the session's serves every other test).
    redis = LocalServers(workdir=tmp_path / "valkey")
    redis.start_redis()
    port = free_port()
    s = msgspec.structs.replace(
        settings,
        redis_url=redis.redis_url,
        metrics_port=port,
        health_stall_s=2.0,
        consumer_session_timeout_ms=6000,
        consumer_max_poll_interval_ms=3000,
        log_format="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "joiner"],
        env=settings_env(s),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def health() -> tuple[int, dict[str, Any]]:
        try:
            status, body = get(port, "/health")
        except OSError:
            return 0, {}
        return status, json.loads(body)

    def wait(status: int, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            got, body = health()
            if got == status:
                return body
            time.sleep(0.1)
        raise AssertionError(f"/health never answered {status}; last {health()}")

    try:
        assert wait(200)["roles"]["joiner"]["healthy"]
        redis.stop_redis()
        down = wait(503, timeout_s=20)
        assert down["roles"]["joiner"]["detail"].startswith("no progress for"), down
        # Its metrics are a joiner's only.
        text = get(port, "/metrics")[1]
        assert "stream_learner_joiner_retries_total" in text and "stream_learner_serving_" not in text
        redis.start_redis()
        wait(200, timeout_s=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        redis.stop()


def test_roles_of_the_metrics_module_are_what_the_cli_asks_for() -> None:
    from stream_learner.cli import VERB_METRICS

    assert {r for roles in VERB_METRICS.values() for r in roles} <= set(ROLES)
    assert VERB_METRICS["serve"] == ("serving", "sdk") and VERB_METRICS["run"] == ("joiner", "trainer")
