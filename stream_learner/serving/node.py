"""The reference serving node behind ``stream-learner serve``: a small HTTP service.

It embeds a :class:`~stream_learner.serving.CheckpointSubscriber` (verified
checkpoints, hot swap; the node needs only what :class:`ModelSource` names)
and logs every prediction it serves with the client SDK, stamped with the
model version that served it, so the joiner can join it with its label and
the trainer can score what was actually served.

Endpoints (JSON):

* ``POST /predict`` — ``{"request_id": "r1", "features": {"x": 1.5}}``
  returns ``{"request_id", "model", "model_version", "prediction"}``; or a
  batch ``{"instances": [{...}, ...]}`` returns ``{"predictions": [...]}``
  (one model version serves the whole batch). ``request_id`` is optional
  (a random one is made). Invalid input: 400 with the field named; no model
  yet: 503.
* ``GET /health`` — 200 once a model serves, with ``model``, ``model_version``
  (a string, as in ``/predict`` and the prediction events) and ``version``
  (the same number as an integer, as in ``/model``); else 503.
* ``GET /model`` — the subscriber's status, the manifest's version, parent,
  metrics and counts, and the history of swaps (version, time).
* ``GET /metrics`` — Prometheus text.

A bad request is the caller's to fix and is answered synchronously, so it
is not dead-lettered: nothing was accepted, nothing is lost.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..checkpoint.reader import LoadedCheckpoint
from ..config import Settings
from ..errors import EventError
from ..events import CheckpointManifest, Codec, Features, Ident, WeightsInfo, now_ms
from ..learn.build import learner_config
from ..learn.learner import OnlineLearner
from ..learn.manifest import servable_weights
from ..metrics import Metrics
from ..sdk import PredictionLogger
from .model import ServedModel, load_served_model
from .subscriber import CheckpointSubscriber, public_keys_from_settings

log = structlog.get_logger(__name__)

#: Largest request body accepted (a batch of a few thousand rows).
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_BATCH = 10_000


class PredictRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One prediction request: the features, and the caller's request id if it has one."""

    features: Features
    request_id: Ident | None = None


class Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ``POST /predict`` body: one request, or ``instances`` served by one model version."""

    features: Features | None = None
    request_id: Ident | None = None
    instances: list[PredictRequest] | None = None


_BODY: Codec[Body] = Codec(Body, MAX_BODY_BYTES)


class ModelSource(Protocol):
    """What the node needs of a subscriber (a :class:`~stream_learner.serving.CheckpointSubscriber` is one)."""

    @property
    def current(self) -> ServedModel | None:
        """The model to serve now, or ``None``; read once per request."""
        ...

    def status(self) -> Mapping[str, Any]:
        """The subscriber's status, JSON-able (``GET /model``)."""
        ...


class ServingNode:
    """An HTTP prediction service that follows the model topic and logs what it serves.

    ``subscriber`` is a started :class:`~stream_learner.serving.CheckpointSubscriber`
    (or any :class:`ModelSource`); ``sdk`` logs predictions
    (``None``: not logged). ``port=0`` binds a free port (see :attr:`url`).
    ``fallback`` serves until the subscriber has a model (see ``--cold-start``).
    """

    def __init__(self, subscriber: ModelSource, *, sdk: PredictionLogger | None = None,
                 metrics: Metrics | None = None, host: str = "127.0.0.1", port: int = 0,
                 fallback: ServedModel | None = None) -> None:
        self.subscriber = subscriber
        self.fallback = fallback
        self.sdk = sdk
        self.metrics = metrics or Metrics()
        self.swaps: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count()  # next() on it is atomic under the GIL
        node = self

        class Handler(_Handler):
            pass

        Handler.node = node
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="serving-http", daemon=True)

    @property
    def current(self) -> ServedModel | None:
        """The model serving now: the subscriber's, else the fallback, else None."""
        served = self.subscriber.current
        return self.fallback if served is None else served

    @property
    def url(self) -> str:
        """Base URL the node listens on, e.g. ``http://127.0.0.1:8080``."""
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ServingNode:
        """Serve HTTP from a background thread; return self."""
        self._thread.start()
        log.info("serving_listening", url=self.url)
        return self

    def stop(self) -> None:
        """Stop serving HTTP (the subscriber and the SDK are the caller's to close)."""
        self.server.shutdown()
        self.server.server_close()

    def record_swap(self, new: ServedModel, old: ServedModel | None = None) -> None:
        """Remember a swap (for ``GET /model``); pass as the subscriber's ``on_swap``."""
        self.swaps.append((new.version, time.time()))

    def _request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def predict(self, requests: Sequence[PredictRequest]) -> list[dict[str, Any]]:
        """Serve ``requests`` with the current model and log each; raise LookupError if none."""
        served = self.current  # one read: the whole batch sees one version
        if served is None:
            raise LookupError("no model loaded yet")
        predictions = served.predict([r.features for r in requests])
        version = str(served.version)
        out = []
        for request, prediction in zip(requests, predictions, strict=True):
            request_id = request.request_id or self._request_id()
            if self.sdk is not None:
                self.sdk.log_prediction(request_id, request.features, prediction,
                                        model=served.model, model_version=version)
            out.append({"request_id": request_id, "model": served.model, "model_version": version,
                        "prediction": prediction})
        self.metrics.serving_predictions.inc(len(out))
        return out

    def model_info(self) -> dict[str, Any]:
        """What ``GET /model`` returns."""
        served = self.current
        info: dict[str, Any] = {"status": dict(self.subscriber.status()),
                                # A copy: the subscriber's thread appends while we read.
                                "swaps": [{"version": v, "at": t} for v, t in list(self.swaps)]}
        if served is not None:
            m = served.manifest
            info.update(model=m.model, version=m.version, parent=m.parent, created_at=m.created_at,
                        counts=m.counts, metrics=m.metrics)
        return info


class _Handler(BaseHTTPRequestHandler):
    node: ServingNode
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    timeout = 30  # a client that stops sending mid-request frees its thread
    # Headers and body leave in two writes; with Nagle on, the body waits for
    # the client's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True
    _post_started: float | None = None  # when the POST /predict being answered arrived

    def log_message(self, format: str, *args: Any) -> None:
        pass  # per-request access logs would dominate the cost; metrics count requests

    def _reply(self, status: int, body: Mapping[str, Any] | bytes, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if (started := self._post_started) is not None:  # a POST /predict: time it
            self._post_started = None
            self.node.metrics.serving_request_seconds.labels(code=str(int(status))).observe(
                time.perf_counter() - started)

    def do_GET(self) -> None:
        node = self.node
        if self.path == "/health":
            served = node.current
            if served is None:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "no model yet"})
            else:
                self._reply(HTTPStatus.OK, {"status": "ok", "model": served.model, "model_version": str(served.version),
                                            "version": served.version})
        elif self.path == "/model":
            self._reply(HTTPStatus.OK, node.model_info())
        elif self.path == "/metrics":
            self._reply(HTTPStatus.OK, generate_latest(node.metrics.registry), CONTENT_TYPE_LATEST)
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:
        self._post_started = time.perf_counter() if self.path == "/predict" else None
        if self.path != "/predict":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY_BYTES else HTTPStatus.LENGTH_REQUIRED
            self._reply(status, {"error": f"a body of 0 to {MAX_BODY_BYTES} bytes with its Content-Length"})
            return
        body = self.rfile.read(length)
        try:
            batch, requests = _parse(body)
        except EventError as exc:
            self.node.metrics.serving_bad_requests.inc()
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc), "kind": exc.kind, "field": exc.field})
            return
        try:
            out = self.node.predict(requests)
        except LookupError as exc:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
            return
        except Exception as exc:
            log.exception("serving_predict_failed")
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._reply(HTTPStatus.OK, {"predictions": out} if batch else out[0])


def _parse(body: bytes) -> tuple[bool, list[PredictRequest]]:
    """A request body as (is it a batch, its requests); EventError naming the problem.

    >>> _parse(b'{"features": {"x": 1.5}, "request_id": "r1"}')
    (False, [PredictRequest(features={'x': 1.5}, request_id='r1')])
    >>> _parse(b'{"features": {"x": "high"}}')
    Traceback (most recent call last):
    ...
    stream_learner.errors.EventError: $.features.x: expected `float | null`, got `str`
    """
    parsed = _BODY.decode(body)
    if parsed.instances is not None:
        if parsed.features is not None or parsed.request_id is not None:
            raise EventError("invalid_value", "$", "give `instances`, or `features` (and `request_id`), not both")
        if len(parsed.instances) > MAX_BATCH:
            raise EventError("invalid_value", "$.instances", f"a batch holds at most {MAX_BATCH} instances")
        return True, parsed.instances
    if parsed.features is None:
        raise EventError("missing_field", "$.features", "missing required field")
    return False, [PredictRequest(features=parsed.features, request_id=parsed.request_id)]


def run_node(settings: Settings, metrics: Metrics, *, stop: threading.Event, cold_start: bool = False) -> None:
    """``stream-learner serve``: follow the model topic and serve HTTP until ``stop`` is set.

    Needs ``serving_public_keys``. With ``cold_start``, an untrained model
    built from the ``trainer_*`` settings serves as version 0 until the
    first verified checkpoint arrives (a new deployment has none yet).
    """
    keys = public_keys_from_settings(settings)  # ConfigError if none is set
    sdk = PredictionLogger(settings=settings, metrics=metrics)
    node: ServingNode | None = None

    def on_swap(new: ServedModel, old: ServedModel | None) -> None:
        if node is not None:
            node.record_swap(new, old)

    # serving_pin_version, if set, is applied by the subscriber itself.
    subscriber = CheckpointSubscriber(settings, keys, on_swap=on_swap, metrics=metrics)
    fallback = cold_start_model(settings) if cold_start else None
    node = ServingNode(subscriber, sdk=sdk, metrics=metrics, host=settings.serving_host,
                       port=settings.serving_port, fallback=fallback)
    metrics.health.add_check("serving", lambda: _has_model(node))
    subscriber.start(wait_s=None)
    node.start()
    try:
        stop.wait()
    finally:
        node.stop()
        subscriber.stop()
        sdk.close()


def _has_model(node: ServingNode) -> tuple[bool, str]:
    """The serving role's health on the metrics port: healthy while it has a model to serve."""
    served = node.current
    return (False, "no model yet") if served is None else (True, f"serving {served.model} v{served.version}")


def cold_start_model(settings: Settings) -> ServedModel:
    """The model the trainer starts from (untrained, built from the ``trainer_*`` settings), as version 0.

    A new deployment has no checkpoint yet; this lets a node answer (and log
    the predictions the first checkpoint learns from) until one arrives. It
    is built locally, not read from the model topic, so nothing needs
    verifying; its manifest is a local stand-in (version 0, no signature).

    >>> from stream_learner.config import Settings
    >>> served = cold_start_model(Settings(trainer_features=["a", "b"], trainer_classes=["no", "yes"]))
    >>> served.version, sorted(served.predict_one({"a": 1.0, "b": None}))
    (0, ['no', 'yes'])
    """
    config = learner_config(settings)
    tensors, _ = OnlineLearner(config).state_dict()
    manifest = CheckpointManifest(
        model=settings.serving_model or settings.trainer_model, version=0, parent=None, created_at=now_ms(),
        input_offsets=[], counts={}, metrics={}, drift_state={}, feature_spec=list(config.spec.features),
        architecture=config.spec.to_dict(), weights=WeightsInfo(format="safetensors", size=0, chunks=1,
                                                               sha256="0" * 64))
    return load_served_model(LoadedCheckpoint(manifest, servable_weights(tensors), {}, settings.topic_models, -1, -1))
