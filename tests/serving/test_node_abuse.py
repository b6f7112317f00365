"""Issue 17.6 and 18.7: abusive HTTP clients against the serving node, on the real broker and subscriber."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization

from stream_learner.config import Settings, settings_env
from stream_learner.local import free_port
from stream_learner.metrics import Metrics
from stream_learner.serving import CheckpointSubscriber, ServingNode
from stream_learner.serving.node import NodeLimits

from .conftest import FEATURES, MODEL, ROW, publish, wait_for
from .test_node import call


@pytest.fixture
def served(settings: Settings, producer: Any, keypair: Any) -> Iterator[CheckpointSubscriber]:
    publish(producer, settings.topic_models, keypair[0], 3)
    sub = CheckpointSubscriber(settings, keypair[1], model=MODEL).start(wait_s=30)
    yield sub
    sub.stop()


def make_node(sub: CheckpointSubscriber, **limits: Any) -> ServingNode:
    return ServingNode(sub, metrics=Metrics(), limits=NodeLimits(**limits)).start()


def host_port(node: ServingNode) -> tuple[str, int]:
    host, port = node.url.removeprefix("http://").split(":")
    return host, int(port)


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, Any]:
    conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def refused(node: ServingNode, reason: str) -> float:
    return (
        node.metrics.registry.get_sample_value("stream_learner_serving_http_refused_total", {"reason": reason}) or 0.0
    )


# -- 17.6: bodies nesting 10,000 levels, and the work one request asks for ------------------------


NESTED = {
    "in a feature value": b'{"features": {"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}",
    "objects in a feature value": b'{"features": {"a": ' + b'{"x":' * 10_000 + b"1" + b"}" * 10_000 + b"}}",
    "under instances": b'{"instances": [{"features": {"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}]}",
    "as instances": b'{"instances": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
}


def test_bodies_nesting_10000_levels_are_answered_400_on_the_same_connection(served: Any) -> None:
    node = make_node(served)
    try:
        conn = http.client.HTTPConnection(*host_port(node), timeout=10)
        for case, body in NESTED.items():
            status, reply = post(conn, body)
            assert status == 400, case
            # Named: nesting refused as such, or the field where an object or a number was due.
            assert (reply["kind"] == "too_deep" and "nest" in reply["error"]) or reply["field"].startswith(
                ("$.features", "$.instances")
            ), (case, reply)
        # The same keep-alive connection still serves.
        status, reply = post(conn, json.dumps({"features": ROW}).encode())
        assert status == 200 and reply["prediction"] == 12.0
        conn.close()
    finally:
        node.stop()


def test_the_work_of_one_request_is_bounded_by_instances_times_features(served: Any) -> None:
    node = make_node(served)
    try:
        wide = {f"f{i}": 1.0 for i in range(4096)}
        body = json.dumps({"instances": [{"features": wide}] * 30}).encode()  # 122,880 values
        status, reply = call(node.url, "POST", "/predict", body)
        assert status == 413 and reply["kind"] == "too_much_work" and "122880 feature values" in reply["error"]
        # 190 x 4,096 values (as the 8 MB body, here ~6 MB in shorter names): refused
        # before it is decoded, on the count of its key-value pairs.
        compact = json.dumps({"features": {f"{i}": 1 for i in range(4096)}}, separators=(",", ":"))
        body = ('{"instances":[' + ",".join([compact] * 190) + "]}").encode()
        assert len(body) < NodeLimits().max_body_bytes
        started = time.monotonic()
        status, reply = call(node.url, "POST", "/predict", body)
        assert status == 413 and reply["kind"] == "too_much_work" and "key-value pairs" in reply["error"]
        assert time.monotonic() - started < 1.0
        # Many instances of the model's own features count too: 2 features x 60,000 > 100,000.
        many = json.dumps({"instances": [{"features": {}}] * 60_000}).encode()
        assert call(node.url, "POST", "/predict", many)[0] == 400  # over the batch size first
        node2 = make_node(served, max_batch=100_000)
        try:
            status, reply = call(node2.url, "POST", "/predict", many)
            assert status == 413 and reply["kind"] == "too_much_work"
        finally:
            node2.stop()
        assert call(node.url, "POST", "/predict", {"instances": [{"features": ROW}] * 1000})[0] == 200
        assert refused(node, "work") == 2.0
    finally:
        node.stop()


# -- 18.7: connections, slow clients, concurrency, resets -----------------------------------------


@pytest.mark.slow
def test_idle_keep_alive_connections_cost_no_thread_and_never_lock_out_a_client(served: Any) -> None:
    node = make_node(served, max_connections=200)
    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(600):
            s = socket.create_connection(host_port(node), timeout=10)
            socks.append(s)
        time.sleep(0.5)
        assert threading.active_count() <= threads_before + 2  # no thread per connection
        status, reply = call(node.url, "POST", "/predict", {"features": ROW})
        assert status == 200 and reply["prediction"] == 12.0
        info = call(node.url, "GET", "/model")[1]
        assert info["http"]["connections"] <= 200
        assert refused(node, "evicted_idle") >= 400
    finally:
        for s in socks:
            s.close()
        node.stop()


@pytest.mark.slow
def test_a_slow_client_is_cut_by_total_time_not_per_byte(served: Any) -> None:
    node = make_node(served, request_timeout_s=1.0)
    try:
        s = socket.create_connection(host_port(node), timeout=10)
        request = b"POST /predict HTTP/1.1\r\nContent-Length: 40\r\n\r\n" + json.dumps({"features": ROW}).encode()
        started, cut = time.monotonic(), None
        try:
            for byte in request:  # one byte every 0.1 s: each in time, the whole far too slow
                s.sendall(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - started > 6:
                    break
        except OSError:
            cut = time.monotonic() - started
        if cut is None:
            s.settimeout(5)
            data = s.recv(4096)
            cut = time.monotonic() - started
            assert data.startswith(b"HTTP/1.1 408") or data == b""
        assert cut < 4.0, f"held {cut:.1f}s"
        s.close()
        assert refused(node, "timeout") >= 1
        assert call(node.url, "POST", "/predict", {"features": ROW})[0] == 200
    finally:
        node.stop()


@pytest.mark.slow
def test_concurrent_large_batches_are_shed_not_queued_and_a_single_request_is_still_served(served: Any) -> None:
    node = make_node(served, max_inflight=4, max_body_bytes=1 << 20, max_batch_values=200_000)
    rows = {"a": 1.0, "b": 2.0}
    big = json.dumps({"instances": [{"features": rows}] * 9000}).encode()  # ~ 0.3 MB, 18,000 values
    statuses: list[int] = []
    stop = threading.Event()

    def flood() -> None:
        conn = http.client.HTTPConnection(*host_port(node), timeout=30)
        while not stop.is_set():
            try:
                statuses.append(post(conn, big)[0])
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(*host_port(node), timeout=30)
        conn.close()

    floods = [threading.Thread(target=flood) for _ in range(12)]
    for t in floods:
        t.start()
    try:
        time.sleep(1.0)
        latencies = []
        for _ in range(20):
            t = time.monotonic()
            assert call(node.url, "POST", "/predict", {"features": ROW})[0] == 200
            latencies.append(time.monotonic() - t)
        assert max(latencies) < 1.0, latencies
    finally:
        stop.set()
        for t in floods:
            t.join()
        node.stop()
    assert 200 in statuses and 503 in statuses  # served up to the bound, shed beyond it


@pytest.mark.slow
def test_client_resets_print_no_traceback(settings: Settings, producer: Any, keypair: Any, tmp_path: Path) -> None:
    pub = tmp_path / "signing.pub.pem"
    pub.write_bytes(
        keypair[1].public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    publish(producer, settings.topic_models, keypair[0], 5)
    port = free_port()
    node_settings = msgspec.structs.replace(
        settings,
        serving_public_keys=[str(pub)],
        serving_port=port,
        trainer_model=MODEL,
        trainer_features=FEATURES,
        trainer_task="regression",
        trainer_architecture="logreg",
        log_format="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "serve"],
        env=settings_env(node_settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return call(url, "GET", "/health")[1].get("version") == 5
            except OSError:
                assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
                return False

        wait_for(ready, timeout_s=60, what="the serve process")
        body = json.dumps({"instances": [{"features": ROW}] * 2000}).encode()
        for cut in (10, 60, len(body) // 2):
            for _ in range(5):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(f"POST /predict HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:cut])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
                s.close()
        for _ in range(5):  # a reset while the answer is being written
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"POST /predict HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        time.sleep(0.5)
        assert call(url, "POST", "/predict", {"features": ROW})[1]["prediction"] == 20.0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    text = (out + err).decode()
    assert "Traceback" not in text, text[-3000:]
    for line in err.decode().splitlines():  # every line on stderr is the JSON log (or kafka-python's)
        assert line.startswith(("{", "WARNING:kafka", "ERROR:kafka", "INFO:kafka")), line
