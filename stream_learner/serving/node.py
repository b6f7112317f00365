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
  (a string, as in ``/predict`` and the prediction events), ``version``
  (the same number as an integer, as in ``/model``) and ``alias`` when the
  node follows one; else 503, whose ``detail`` says why when the subscriber
  knows (an alias not set; a model the topic holds no checkpoint of, naming
  the models it holds).
* ``GET /model`` — ``alias``, ``serving_by`` (``newest``, ``alias champion
  v12``, ``registry pin v9``, ``local pin v7``), ``problem``, the
  subscriber's status (with the registry's state), the manifest's version,
  parent, metrics, counts, weights digest and layout (precision, base
  digest, delta or full), the history of swaps (version, time), and with
  ``serving_shadow`` the ``shadow`` section (which challenger is shadowed,
  or why none; its counts: :mod:`stream_learner.serving.shadow`).
* ``GET /metrics`` — Prometheus text.

A bad request is the caller's to fix and is answered synchronously, so it
is not dead-lettered: nothing was accepted, nothing is lost. What bounds a
client (connections, admission, work, time): :class:`NodeLimits`; the
asyncio HTTP front that enforces them: :mod:`stream_learner.serving.http`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, Protocol

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..checkpoint.reader import LoadedCheckpoint
from ..config import Settings
from ..errors import EventError
from ..events import CheckpointManifest, WeightsInfo, WeightsLayout, now_ms
from ..learn.build import learner_config
from ..learn.featurizer import RowsRefused
from ..learn.learner import OnlineLearner
from ..learn.manifest import servable_weights
from ..metrics import Metrics
from ..sdk import PredictionLogger
from .http import HttpFront, NodeLimits, _Connection
from .model import BuildPolicy, ServedModel, load_served_model
from .requests import PredictRequest, parse, work_of
from .shadow import Shadow
from .subscriber import CheckpointSubscriber
from .telemetry import serving_metrics
from .trust import public_keys_from_settings

log = structlog.get_logger(__name__)

#: After a large body, its worker pauses this many times as long as it took (see ServingNode._answer_heavy).
HEAVY_PAUSE = 1.0


class ModelSource(Protocol):
    """What the node needs of a subscriber (a :class:`~stream_learner.serving.CheckpointSubscriber` is one)."""

    @property
    def current(self) -> ServedModel | None:
        """The model to serve now, or ``None``; read once per request."""
        ...

    def status(self) -> Mapping[str, Any]:
        """The subscriber's status, JSON-able (``GET /model``)."""
        ...


class ServingNode(HttpFront):
    """An HTTP prediction service that follows the model topic and logs what it serves.

    ``subscriber`` is a started :class:`~stream_learner.serving.CheckpointSubscriber`
    (or any :class:`ModelSource`); ``sdk`` logs predictions
    (``None``: not logged). ``port=0`` binds a free port (see :attr:`url`).
    ``fallback`` serves until the subscriber has a model (see ``--cold-start``).
    ``limits``: see :class:`NodeLimits`. ``shadow``, a started
    :class:`~stream_learner.serving.shadow.Shadow`, sees what each request was
    answered, after the answer is made (``serving_shadow``; the node never
    waits for it).

    The server is asyncio's (the standard library): one event loop thread
    holds every connection, reads requests, answers small ones and writes
    answers; large bodies are decoded and predicted on bounded worker
    threads. Idle and slow connections cost no thread; see
    :class:`NodeLimits` for what bounds what.
    """

    def __init__(
        self,
        subscriber: ModelSource,
        *,
        sdk: PredictionLogger | None = None,
        metrics: Metrics | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        fallback: ServedModel | None = None,
        limits: NodeLimits | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        self.subscriber = subscriber
        self.shadow = shadow
        self.fallback = fallback
        self.sdk = sdk
        self.metrics = metrics or Metrics()
        self.telemetry = serving_metrics(self.metrics)
        self.limits = limits or NodeLimits()
        self.swaps: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count()  # next() on it is atomic under the GIL
        # Bound now, so that url is known and a port in use fails here; a deep backlog so that a
        # burst of connections waits in the kernel rather than being reset.
        self._socket = socket.create_server((host, port), backlog=1024)
        self._socket.setblocking(False)
        self._heavy = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="serving-worker")
        self._heavy_gate = threading.Lock()
        self._last_light = 0.0  # when a light request last came (monotonic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="serving-http", daemon=True)
        self._connections: dict[_Connection, None] = {}  # insertion order: the oldest first
        self._inflight = 0  # large bodies admitted (on the workers or waiting for one)
        self._inflight_bytes = 0
        self._inflight_light = 0  # bodies of up to LIGHT_BYTES admitted

    @property
    def current(self) -> ServedModel | None:
        """The model serving now: the subscriber's, else the fallback, else None.

        The fallback (version 0) serves only while the subscriber knows no
        good version at all: a node whose floor is above 0 never serves less.
        """
        served = self.subscriber.current
        if served is None and self.fallback is not None and not getattr(self.subscriber, "floor_version", 0):
            return self.fallback
        return served

    @property
    def problem(self) -> str | None:
        """Why the node serves nothing (or not what it was asked to), if its source says (a wrong model
        name, an alias not set)."""
        problem = getattr(self.subscriber, "problem", None)
        return problem if isinstance(problem, str) else None

    @property
    def url(self) -> str:
        """Base URL the node listens on, e.g. ``http://127.0.0.1:8080``."""
        host, port = self._socket.getsockname()[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ServingNode:
        """Serve HTTP from a background thread; return self."""
        self._thread.start()
        self._ready.wait(30)
        log.info("serving_listening", url=self.url)
        return self

    def stop(self) -> None:
        """Stop serving HTTP (the subscriber and the SDK are the caller's to close)."""
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stopped.set)
            self._thread.join(30)
        self._socket.close()
        self._heavy.shutdown(wait=False, cancel_futures=True)

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
        ids: list[str] = []
        for request, prediction in zip(requests, predictions, strict=True):
            request_id = request.request_id or self._request_id()
            ids.append(request_id)
            if self.sdk is not None:
                self.sdk.log_prediction(
                    request_id, request.features, prediction, model=served.model, model_version=version
                )
            out.append(
                {"request_id": request_id, "model": served.model, "model_version": version, "prediction": prediction}
            )
        self.metrics.serving_predictions.inc(len(out))
        if self.shadow is not None:  # after the answer is made; observe never blocks nor raises
            self.shadow.observe(served, ids, [r.features for r in requests], predictions)
        return out

    def model_info(self) -> dict[str, Any]:
        """What ``GET /model`` returns."""
        served = self.current
        status = dict(self.subscriber.status())
        info: dict[str, Any] = {
            "alias": status.get("alias"),
            "serving_by": status.get("serving_by"),
            "problem": self.problem,
            "status": status,
            # A copy: the subscriber's thread appends while we read.
            "swaps": [{"version": v, "at": t} for v, t in list(self.swaps)],
            "http": {"connections": len(self._connections), "inflight": self._inflight + self._inflight_light},
        }
        if self.shadow is not None:
            info["shadow"] = self.shadow.status(served)
        if served is not None:
            m = served.manifest
            info.update(
                model=m.model,
                version=m.version,
                parent=m.parent,
                created_at=m.created_at,
                counts=m.counts,
                metrics=m.metrics,
                weights_sha256=m.weights.sha256,
                # dtype, base digest, delta or full (None: an ordinary float32 checkpoint).
                layout=msgspec.to_builtins(m.layout) if m.layout is not None else None,
            )
        return info

    # -- the work of one POST /predict, on a worker thread -----------------------------------------

    def _answer_heavy(self, body: bytes) -> tuple[int, Mapping[str, Any]]:
        """A large body: one at a time, then a pause as long as it took. Decoding and predicting a large
        batch holds the GIL in long C calls; so paced, large batches use at most half of it, and the
        event loop and the light lane get the rest (a single request's latency stays bounded)."""
        with self._heavy_gate:
            started = time.perf_counter()
            try:
                return self._answer_predict(body)
            finally:
                # Only while single requests are being served: batches alone run at full speed.
                if time.monotonic() - self._last_light < 1.0:
                    time.sleep((time.perf_counter() - started) * HEAVY_PAUSE)

    def _answer_predict(self, body: bytes) -> tuple[int, Mapping[str, Any]]:
        # Every feature value has its colon: a body with far more colons than the work bound allows
        # is refused before the cost of decoding it (bytes.count is a C loop; names holding colons
        # are allowed for by the factor 2).
        pairs = body.count(b":")
        if pairs > 2 * self.limits.max_batch_values + 16:
            self.telemetry.http_refused.labels(reason="work").inc()
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                "error": f"the body holds {pairs} key-value pairs; a request may ask for at most "
                f"{self.limits.max_batch_values} feature values: send smaller batches",
                "kind": "too_much_work",
                "field": "$",
            }
        try:
            batch, requests = parse(body, self.limits.max_batch)
            served = self.current
            work = work_of(requests, len(served.spec.features) if served is not None else 0)
            if work > self.limits.max_batch_values:
                self.telemetry.http_refused.labels(reason="work").inc()
                return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                    "error": f"the request asks for {work} feature values (instances x features); the limit is "
                    f"{self.limits.max_batch_values}: send smaller batches",
                    "kind": "too_much_work",
                    "field": "$.instances" if batch else "$.features",
                }
        except EventError as exc:
            self.metrics.serving_bad_requests.inc()
            return HTTPStatus.BAD_REQUEST, {"error": str(exc), "kind": exc.kind, "field": exc.field}
        try:
            out = self.predict(requests)
        except LookupError as exc:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)}
        except RowsRefused as exc:  # a value that does not fit the model's declared inputs: the caller's
            self.metrics.serving_bad_requests.inc()
            field = f"$.instances[{min(exc.errors)}]{exc.field[1:]}" if batch else exc.field
            return HTTPStatus.BAD_REQUEST, {"error": f"{field}: {exc.reason}", "kind": exc.kind, "field": field}
        except Exception as exc:  # ours, not the caller's: answer 500, keep serving
            log.exception("serving_predict_failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"}
        return HTTPStatus.OK, ({"predictions": out} if batch else out[0])

    def _get(self, path: str) -> tuple[int, Mapping[str, Any] | bytes, str]:
        if path == "/health":
            served = self.current
            problem = self.problem
            if served is None:
                body: dict[str, Any] = {"status": "no model yet"}
                if problem is not None:
                    body["detail"] = problem
                return HTTPStatus.SERVICE_UNAVAILABLE, body, "application/json"
            ok: dict[str, Any] = {
                "status": "ok",
                "model": served.model,
                "model_version": str(served.version),
                "version": served.version,
            }
            if getattr(self.subscriber, "alias", None):
                ok["alias"] = self.subscriber.alias  # type: ignore[attr-defined]
            if problem is not None:
                ok["detail"] = problem
            return HTTPStatus.OK, ok, "application/json"
        if path == "/model":
            return HTTPStatus.OK, self.model_info(), "application/json"
        if path == "/metrics":
            return HTTPStatus.OK, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST
        return HTTPStatus.NOT_FOUND, {"error": f"no such path {path}"}, "application/json"


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
    shadow = Shadow.from_settings(settings, keys, metrics=metrics)  # serving_shadow, if set
    fallback = cold_start_model(settings) if cold_start else None
    node = ServingNode(
        subscriber,
        sdk=sdk,
        metrics=metrics,
        host=settings.serving_host,
        port=settings.serving_port,
        fallback=fallback,
        limits=NodeLimits.from_settings(settings),
        shadow=shadow,
    )
    metrics.health.add_check("serving", lambda: _has_model(node))
    subscriber.start(wait_s=None)
    if shadow is not None:
        shadow.start()
    node.start()
    try:
        stop.wait()
    finally:
        node.stop()
        if shadow is not None:
            shadow.stop()
        subscriber.stop()
        sdk.close()


def _has_model(node: ServingNode) -> tuple[bool, str]:
    """The serving role's health on the metrics port: healthy while it has a model to serve."""
    served = node.current
    if served is None:
        return False, node.problem or "no model yet"
    return True, f"serving {served.model} v{served.version}"


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
    learner = OnlineLearner(config)
    tensors, _ = learner.state_dict()
    manifest = CheckpointManifest(
        model=settings.serving_model or settings.trainer_model,
        version=0,
        parent=None,
        created_at=now_ms(),
        input_offsets=[],
        counts={},
        metrics={},
        drift_state={},
        feature_spec=list(config.spec.features),
        architecture=config.spec.to_dict(),
        weights=WeightsInfo(format="safetensors", size=0, chunks=1, sha256="0" * 64),
    )
    # Built from the operator's own settings: their architecture is allowed by definition.
    policy = BuildPolicy.of([c for c in (config.spec.kind, config.spec.collate) if c], max_parameters=1 << 62)
    # On a frozen base: the whole model (the frozen parameters are the learner's, from the base).
    full = WeightsLayout(delta=False) if config.base is not None else None
    weights = servable_weights(tensors, full, learner.frozen_tensors())
    return load_served_model(LoadedCheckpoint(manifest, weights, {}, settings.topic_models, -1, -1), policy)
