"""The reference serving node over real HTTP, the real broker and the real subscriber."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization

from stream_learner.config import Settings, settings_env
from stream_learner.events import PREDICTION
from stream_learner.local import free_port
from stream_learner.metrics import Metrics
from stream_learner.sdk import PredictionLogger
from stream_learner.serving import CheckpointSubscriber, ServingNode, cold_start_model

from ..procs import read_topic
from .conftest import FEATURES, MODEL, ROW, publish, wait_for


def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One HTTP request; the status and the decoded JSON (or text) reply."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode()
    finally:
        conn.close()


class ServeProcess:
    """A ``stream-learner serve`` process and its URL; ``out`` is its output once it has stopped."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc, self.url, self.out = proc, url, ""

    def get(self, path: str) -> tuple[int, Any] | None:
        """``GET path``, or None while the node is not listening yet (the process must still run)."""
        try:
            return call(self.url, "GET", path)
        except OSError:
            assert self.proc.poll() is None, self.proc.stdout.read().decode() if self.proc.stdout else ""
            return None


@contextlib.contextmanager
def serve_process(settings: Settings, keypair: Any, tmp_path: Path, **overrides: Any) -> Iterator[ServeProcess]:
    """Run ``stream-learner serve`` trusting ``keypair``'s public key; SIGTERM at the end, which it must obey."""
    pub = tmp_path / "signing.pub.pem"
    pub.write_bytes(
        keypair[1].public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    port = free_port()
    s = msgspec.structs.replace(settings, serving_public_keys=[str(pub)], serving_port=port, **overrides)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "serve"],
        env=settings_env(s),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    served = ServeProcess(proc, f"http://127.0.0.1:{port}")
    try:
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        served.out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, 130), served.out[-2000:]


def raw_status(url: str, request: str) -> int:
    """The status code of a hand-written HTTP request (headers a client library would not send)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request.encode())
        return int(sock.recv(1024).split()[1])


@pytest.fixture
def node_settings(settings: Settings) -> Settings:
    # The cold-start model is the trainer's starting point: same spec as the published versions.
    return msgspec.structs.replace(
        settings,
        trainer_model=MODEL,
        trainer_features=FEATURES,
        trainer_task="regression",
        trainer_architecture="logreg",
    )


@pytest.fixture
def node(node_settings: Settings, keypair: Any) -> Iterator[ServingNode]:
    metrics = Metrics()
    sdk = PredictionLogger(settings=node_settings, metrics=metrics)
    holder: list[ServingNode] = []
    sub = CheckpointSubscriber(
        node_settings,
        keypair[1],
        metrics=metrics,
        on_swap=lambda new, old: holder[0].record_swap(new, old) if holder else None,
    )
    n = ServingNode(sub, sdk=sdk, metrics=metrics, fallback=cold_start_model(node_settings))
    holder.append(n)
    sub.start(wait_s=None)
    n.start()
    yield n
    n.stop()
    sub.stop()
    sdk.close()


def test_predictions_are_served_stamped_and_logged_then_a_checkpoint_is_swapped_in(
    node: ServingNode, node_settings: Settings, producer: Any, keypair: Any
) -> None:
    status, cold = call(node.url, "POST", "/predict", {"request_id": "r-0", "features": ROW})
    assert status == 200 and cold["model_version"] == "0" and cold["model"] == MODEL
    assert isinstance(cold["prediction"], float)

    publish(producer, node_settings.topic_models, keypair[0], 3)
    wait_for(lambda: call(node.url, "GET", "/health")[1].get("model_version") == "3", what="v3 served")
    status, one = call(node.url, "POST", "/predict", {"request_id": "r-1", "features": ROW})
    assert status == 200 and one == {"request_id": "r-1", "model": MODEL, "model_version": "3", "prediction": 12.0}
    status, batch = call(
        node.url,
        "POST",
        "/predict",
        {"instances": [{"features": ROW}, {"request_id": "r-3", "features": {"a": 0.0, "b": None}}]},
    )
    assert status == 200
    first, second = batch["predictions"]
    assert first["prediction"] == 12.0 and first["request_id"]  # an id is made when none is given
    assert second["request_id"] == "r-3" and second["prediction"] == 3.0  # b missing: imputed as the mean (0)

    # Every prediction is logged with the version that served it, for the joiner.
    assert node.sdk is not None and node.sdk.flush(10)
    logged = {}
    for p in range(node_settings.partitions_input):
        for record in read_topic(node_settings, node_settings.topic_predictions, partition=p):
            event = PREDICTION.decode(record.value)
            logged[event.request_id] = event
    assert len(logged) == 4
    assert logged["r-0"].model_version == "0" and logged["r-1"].model_version == "3"
    assert logged["r-1"].prediction == 12.0 and logged["r-1"].features == ROW
    assert logged["r-3"].features == {"a": 0.0, "b": None}

    info = call(node.url, "GET", "/model")[1]
    assert info["version"] == 3 and [s["version"] for s in info["swaps"]] == [3]
    assert info["status"]["failures"] == 0
    status, text = call(node.url, "GET", "/metrics")
    assert status == 200 and "stream_learner_serving_predictions_total 4.0" in text


def test_bad_requests_are_refused_with_the_field_named(node: ServingNode) -> None:
    status, reply = call(node.url, "POST", "/predict", {"features": {"a": "high"}})
    assert status == 400 and reply["field"] == "$.features.a" and reply["kind"] == "wrong_type"
    status, reply = call(node.url, "POST", "/predict", b'{"features": {"a": NaN}}')
    assert status == 400 and reply["kind"] == "non_finite"
    status, reply = call(node.url, "POST", "/predict", {"features": {}, "extra": 1})
    assert status == 400 and "extra" in reply["error"]
    status, reply = call(node.url, "POST", "/predict", {"instances": [{"features": ROW}, {"feature": ROW}]})
    assert status == 400 and reply["field"].startswith("$.instances[1]")
    status, reply = call(node.url, "POST", "/predict", {"instances": [], "features": ROW})
    assert status == 400 and "not both" in reply["error"]
    status, reply = call(node.url, "POST", "/predict", {"request_id": "r"})
    assert status == 400 and reply["field"] == "$.features"
    for length in ("abc", "-1"):
        assert raw_status(node.url, f"POST /predict HTTP/1.1\r\nContent-Length: {length}\r\n\r\n{{}}") == 411
    assert raw_status(node.url, "POST /predict HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n") == 413
    assert call(node.url, "GET", "/nope")[0] == 404
    assert call(node.url, "POST", "/other", {})[0] == 404
    # The node still serves after all that.
    assert call(node.url, "POST", "/predict", {"features": ROW})[0] == 200
    assert "stream_learner_serving_bad_requests_total 6.0" in call(node.url, "GET", "/metrics")[1]
    # A feature may be called "instances".
    assert call(node.url, "POST", "/predict", {"features": {"instances": 1.0}})[0] == 200


def test_without_a_model_the_node_answers_503(settings: Settings, keypair: Any) -> None:
    sub = CheckpointSubscriber(settings, keypair[1], model="nothing-published").start(wait_s=None)
    node = ServingNode(sub).start()
    try:
        assert call(node.url, "GET", "/health")[0] == 503
        status, reply = call(node.url, "POST", "/predict", {"features": ROW})
        assert status == 503 and "no model" in reply["error"]
    finally:
        node.stop()
        sub.stop()


@pytest.mark.slow
def test_the_serve_command_runs_a_node_until_sigterm(
    node_settings: Settings, producer: Any, keypair: Any, tmp_path: Path
) -> None:
    publish(producer, node_settings.topic_models, keypair[0], 5)
    with serve_process(node_settings, keypair, tmp_path) as node:
        wait_for(
            lambda: (r := node.get("/health")) is not None and r[1].get("model_version") == "5",
            timeout_s=60,
            what="the serve process to serve v5",
        )
        assert call(node.url, "POST", "/predict", {"features": ROW})[1]["prediction"] == 20.0


@pytest.mark.slow
def test_serve_without_public_keys_is_a_configuration_error(settings: Settings) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli", "serve"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "serving_public_keys" in out.stdout + out.stderr


def test_cold_start_is_the_trainers_untrained_model(node_settings: Settings) -> None:
    from stream_learner.learn.build import learner_config
    from stream_learner.learn.learner import OnlineLearner

    served = cold_start_model(node_settings)
    config = learner_config(node_settings)
    learner = OnlineLearner(config)
    assert served.version == 0 and served.spec == config.spec
    for name, tensor in learner.main.model.state_dict().items():
        assert bool((served.network.state_dict()[name] == tensor).all()), name


def test_health_and_predict_give_the_model_version_alike_and_requests_are_timed(node: ServingNode) -> None:
    status, health = call(node.url, "GET", "/health")
    status_p, answer = call(node.url, "POST", "/predict", {"features": ROW})
    assert status == status_p == 200
    # The same string everywhere a body says model_version (as in the prediction events); version: the integer.
    assert health["model_version"] == answer["model_version"] == "0" and health["version"] == 0
    assert call(node.url, "POST", "/predict", {"features": {"a": "high"}})[0] == 400
    registry = node.metrics.registry
    assert registry.get_sample_value("stream_learner_serving_request_seconds_count", {"code": "200"}) == 1
    assert registry.get_sample_value("stream_learner_serving_request_seconds_count", {"code": "400"}) == 1
    assert 0 < registry.get_sample_value("stream_learner_serving_request_seconds_sum", {"code": "200"}) < 5
    call(node.url, "GET", "/model")  # not a prediction: not timed
    assert registry.get_sample_value("stream_learner_serving_request_seconds_count", {"code": "200"}) == 1


@pytest.mark.slow
def test_the_serve_process_exports_serving_metrics_only_and_its_health(
    node_settings: Settings, producer: Any, keypair: Any, tmp_path: Path
) -> None:
    publish(producer, node_settings.topic_models, keypair[0], 5)
    metrics_port = free_port()
    with serve_process(node_settings, keypair, tmp_path, metrics_port=metrics_port) as node:
        wait_for(
            lambda: (r := node.get("/health")) is not None and r[0] == 200,
            timeout_s=60,
            what="the serve process to serve v5",
        )
        assert call(node.url, "POST", "/predict", {"features": ROW})[0] == 200
        for where in (node.url, f"http://127.0.0.1:{metrics_port}"):
            text = call(where, "GET", "/metrics")[1]
            names = set(re.findall(r"^# TYPE (\S+)", text, re.M))
            assert not {
                n
                for n in names
                if n.startswith(("stream_learner_joiner_", "stream_learner_trainer_", "stream_learner_events_decoded"))
            }, names
            assert {
                "stream_learner_serving_model_version",
                "stream_learner_serving_request_seconds",
                "stream_learner_sdk_events_total",
                "stream_learner_build_info",
                "process_cpu_seconds_total",
            } <= names
            assert 'stream_learner_serving_request_seconds_count{code="200"} 1.0' in text
        status, health = call(f"http://127.0.0.1:{metrics_port}", "GET", "/health")
        assert status == 200 and health["roles"]["serving"] == {"healthy": True, "detail": f"serving {MODEL} v5"}


def test_stop_finishes_the_request_in_flight_closes_idle_connections_and_stops_accepting(node: ServingNode) -> None:
    import socket
    import threading

    host, port = node.url.removeprefix("http://").split(":")
    body = json.dumps({"features": ROW}).encode()
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    idle = socket.create_connection((host, int(port)), timeout=10)
    busy = socket.create_connection((host, int(port)), timeout=10)
    try:
        busy.sendall(head.encode())  # a request half sent when the stop comes
        wait_for(lambda: any(not c.idle for c in node._connections), 5, "the node reading the request")
        stopper = threading.Thread(target=node.stop)
        stopper.start()
        wait_for(lambda: node._stopped is not None and node._stopped.is_set(), 5, "the stop")
        assert idle.recv(1024) == b""  # the idle connection is closed at once
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2)  # nothing new is accepted
        busy.sendall(b"\r\n" + body)
        reply = b""
        while chunk := busy.recv(65536):
            reply += chunk
        stopper.join(10)
        assert not stopper.is_alive()
    finally:
        idle.close()
        busy.close()
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", reply
    assert b"Connection: close" in rest
    assert "prediction" in json.loads(rest.partition(b"\r\n\r\n")[2])
