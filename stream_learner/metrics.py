"""Prometheus metrics, held in a registry that is passed down (never the global one).

Names follow Prometheus conventions: ``stream_learner_`` prefix, base units,
``_total`` for counters, ``_seconds``/``_bytes`` suffixes.

**Per role.** A process exports the families of the roles it runs
(:data:`ROLES`; the CLI says which per verb), plus build information and the
standard process and Python collectors: a serving node's ``/metrics`` holds
serving and SDK families, not a joiner's. Every attribute exists whatever the
roles, so code may count into any family; one not exported is simply not
registered.

:meth:`Metrics.serve` serves ``/metrics`` and ``/health`` (see
:mod:`stream_learner.health`) on the metrics port.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .health import Health

#: The roles whose families a process may export. ``sdk``: the client SDK's
#: (a serving node logs through it); ``smoke``: the count check's decoder;
#: ``optimize``: the variants role's (a trainer exports those families too).
ROLES = ("joiner", "trainer", "optimize", "serving", "sdk", "smoke")

#: Rolling prequential metrics of the trainer (key in the learner's summary -> gauge suffix, meaning).
ROLLING = {
    "accuracy_rolling": (
        "accuracy",
        (
            "Accuracy of the model's own predictions (each predicted before it is "
            "learned) over the last trainer_metrics_window labeled examples."
        ),
    ),
    "log_loss_rolling": ("log_loss", "Log loss of the model's own predictions, same window."),
    "served_accuracy_rolling": (
        "served_accuracy",
        ("Accuracy of what the application served (the prediction events), same window."),
    ),
    "served_log_loss_rolling": ("served_log_loss", "Log loss of what the application served, same window."),
    "mae_rolling": ("mae", "Mean absolute error of the model's own predictions (regression), same window."),
    "rmse_rolling": ("rmse", "Root mean squared error of the model's own predictions (regression), same window."),
    "served_mae_rolling": ("served_mae", "Mean absolute error of what the application served, same window."),
    "served_rmse_rolling": ("served_rmse", "Root mean squared error of what the application served, same window."),
}

# Summing whole windows costs ~50 us; a chunk of 32 examples takes less than a millisecond.
ROLLING_EVERY_S = 1.0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


class Metrics:
    """All metrics of one process, for ``roles`` (default: every role).

    ``health`` is the process's :class:`~stream_learner.health.Health`, which
    the roles report their progress to.

    >>> m = Metrics(roles=["smoke"])
    >>> m.events_decoded.labels(type="prediction").inc()
    >>> m.registry.get_sample_value("stream_learner_events_decoded_total", {"type": "prediction"})
    1.0
    >>> m.joiner_duplicates.inc()  # counted, not exported: this process is no joiner
    >>> m.registry.get_sample_value("stream_learner_joiner_duplicates_total") is None
    True
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        roles: Iterable[str] | None = None,
        health: Health | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.roles = frozenset(ROLES if roles is None else roles)
        if unknown := self.roles - set(ROLES):
            raise ValueError(f"unknown roles {sorted(unknown)}; known: {ROLES}")
        self.health = health or Health()
        r = self.registry

        def of(*roles: str) -> CollectorRegistry | None:
            return r if self.roles & set(roles) else None

        Info("stream_learner_build", "Versions this process runs (value 1).", registry=r).info(
            {
                "version": _version("stream-learner"),
                "python": platform.python_version(),
                "kafka_python": _version("kafka-python"),
                "redis_py": _version("redis"),
                "torch": _version("torch"),
            }
        )
        # The global registry has these; a registry of our own gets its own.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.events_decoded = Counter(
            "stream_learner_events_decoded_total", "Events decoded, by event type.", ["type"], registry=of("smoke")
        )
        self.dead_letters = Counter(
            "stream_learner_dead_letters_total",
            "Records sent to the dead-letter topic, by stage and error kind.",
            ["stage", "kind"],
            registry=of("joiner", "trainer", "smoke"),
        )
        self.dead_letters_truncated = Counter(
            "stream_learner_dead_letters_truncated_total",
            "Dead letters sent with their value cut (too large to carry whole), by stage.",
            ["stage"],
            registry=of("joiner", "trainer", "smoke"),
        )
        self.dead_letters_unsendable = Counter(
            "stream_learner_dead_letters_unsendable_total",
            "Refused records the broker would not take even truncated: logged and skipped, by stage.",
            ["stage"],
            registry=of("joiner", "trainer", "smoke"),
        )
        self.sdk_events = Counter(
            "stream_learner_sdk_events_total",
            "SDK events by outcome: sent (acknowledged), failed (delivery error), dropped (buffer full).",
            ["type", "outcome"],
            registry=of("sdk"),
        )
        self.sdk_buffered_bytes = Gauge(
            "stream_learner_sdk_buffered_bytes", "Bytes waiting in the SDK buffer.", registry=of("sdk")
        )
        self.kafka_commit_seconds = Histogram(
            "stream_learner_kafka_commit_seconds", "Time to commit consumer offsets.", registry=of("joiner")
        )

        j = of("joiner")
        self.joiner_events = Counter(
            "stream_learner_joiner_events_total", "Input records read by the joiner, by topic.", ["topic"], registry=j
        )
        self.joiner_joins = Counter(
            "stream_learner_joiner_joins_total",
            "Join outcomes: labeled, unlabeled, late examples; early_label stored; orphan_label_dropped.",
            ["kind"],
            registry=j,
        )
        self.joiner_duplicates = Counter(
            "stream_learner_joiner_duplicates_total", "Events that had already been applied.", registry=j
        )
        self.joiner_redis_seconds = Histogram(
            "stream_learner_joiner_redis_seconds",
            "Round-trip time of one join step in Redis.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=j,
        )
        self.joiner_retries = Counter(
            "stream_learner_joiner_retries_total",
            "Retries while a dependency was unavailable.",
            ["dependency"],
            registry=j,
        )
        self.joiner_watermark_lag = Gauge(
            "stream_learner_joiner_watermark_lag_seconds", "Wall clock minus the event-time watermark.", registry=j
        )
        self.joiner_consumer_lag = Gauge(
            "stream_learner_joiner_consumer_lag_records", "Records not yet read on the assigned partitions.", registry=j
        )

        t = of("trainer")
        self.trainer_examples = Counter(
            "stream_learner_trainer_examples_total", "Example records the trainer applied.", registry=t
        )
        self.trainer_loss = Gauge(
            "stream_learner_trainer_batch_loss", "Training loss of the last mini-batch.", registry=t
        )
        self.trainer_drifts = Counter(
            "stream_learner_trainer_drift_total",
            "Drift findings, by kind and detector.",
            ["kind", "detector"],
            registry=t,
        )
        self.trainer_checkpoints = Counter(
            "stream_learner_trainer_checkpoints_total", "Checkpoints published.", registry=t
        )
        self.trainer_retries = Counter(
            "stream_learner_trainer_retries_total",
            "Retries while a dependency (its state store, Kafka) was down.",
            ["dependency"],
            registry=t,
        )
        self.trainer_version = Gauge(
            "stream_learner_trainer_model_version", "Version of the last published checkpoint.", registry=t
        )
        self.trainer_consumer_lag = Gauge(
            "stream_learner_trainer_consumer_lag_records",
            "Examples not yet read on the examples partitions.",
            registry=t,
        )
        self.trainer_rolling = {
            key: Gauge(f"stream_learner_trainer_rolling_{name}", doc, ["model"], registry=t)
            for key, (name, doc) in ROLLING.items()
        }
        # The champion and the running challenger, scored on the same labels (stream_learner.optimize.challenger).
        self.trainer_challenge_accuracy = Gauge(
            "stream_learner_trainer_challenge_accuracy",
            "Rolling accuracy (the last trainer_metrics_window labeled examples) of the champion (model=<model>) "
            "and of the running challenger (model=<model>#challenger), each scored on the same labeled examples "
            "since the challenger started; absent while no challenger runs.",
            ["model"],
            registry=t,
        )
        self.trainer_challenge_accuracy_cumulative = Gauge(
            "stream_learner_trainer_challenge_accuracy_cumulative",
            "Accuracy of the champion and of the challenger over every labeled example since the challenger "
            "started (what promotion at a drift compares); absent while no challenger runs.",
            ["model"],
            registry=t,
        )
        self.trainer_challenge_examples = Gauge(
            "stream_learner_trainer_challenge_examples",
            "Labeled examples the champion and the challenger were both scored on since it started (0: none runs).",
            registry=t,
        )
        #: The rolling gauges are set at most this often (0: at every chunk).
        self.rolling_every_s = ROLLING_EVERY_S
        self._rolling_at: float | None = None
        self._challenge_at: float | None = None
        self._challenged: tuple[str, ...] = ()  # the model labels the challenge gauges hold now

        s = of("serving")
        self.serving_version = Gauge(
            "stream_learner_serving_model_version",
            "Version of the model a serving node serves (0: none yet).",
            registry=s,
        )
        self.serving_swaps = Counter(
            "stream_learner_serving_swaps_total", "Models swapped in by the checkpoint subscriber.", registry=s
        )
        self.serving_swap_failures = Counter(
            "stream_learner_serving_swap_failures_total",
            "Checkpoints the subscriber refused or could not load (the last good model kept), by reason.",
            ["reason"],
            registry=s,
        )
        self.serving_stale_manifests = Counter(
            "stream_learner_serving_stale_manifests_total",
            "Manifests ignored because their version is not newer than the one followed (replays).",
            registry=s,
        )
        self.serving_swap_seconds = Histogram(
            "stream_learner_serving_swap_seconds",
            "Time from reading a manifest record to serving its model.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=s,
        )
        self.serving_predictions = Counter(
            "stream_learner_serving_predictions_total", "Predictions served by `stream-learner serve`.", registry=s
        )
        self.serving_bad_requests = Counter(
            "stream_learner_serving_bad_requests_total", "Requests `stream-learner serve` refused with 400.", registry=s
        )
        self.serving_request_seconds = Histogram(
            "stream_learner_serving_request_seconds",
            "Time `stream-learner serve` took to answer a POST /predict, from its first byte read to its reply "
            "written, by HTTP status code.",
            ["code"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=s,
        )

        # Serving variants (stream_learner.optimize): derived by a trainer, a replay or the optimize role.
        v = of("trainer", "optimize")
        self.variants_published = Counter(
            "stream_learner_variants_published_total",
            "Serving variants that passed their gate and were published.",
            ["variant"],
            registry=v,
        )
        self.variants_skipped = Counter(
            "stream_learner_variants_skipped_total",
            "Serving variants not published, by reason: accuracy, slower, too_few_examples, not_applicable.",
            ["variant", "reason"],
            registry=v,
        )
        self.variant_seconds = Histogram(
            "stream_learner_variant_seconds",
            "Time to build and gate one variant.",
            ["variant"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=v,
        )
        self.serving_variant_fallback = Gauge(
            "stream_learner_serving_variant_fallback",
            "1 while a node asked for a variant serves the parent (no passing variant recent enough), else 0.",
            registry=s,
        )
        self.serving_variant_version = Gauge(
            "stream_learner_serving_variant_version",
            "Parent version of the variant a node serves (0: it serves no variant).",
            registry=s,
        )
        # Shadow traffic (serving_shadow; stream_learner.serving.shadow).
        self.serving_shadow_version = Gauge(
            "stream_learner_serving_shadow_version",
            "Version of the challenger a node shadowed at its last request (0: none).",
            registry=s,
        )
        self.serving_shadow_predictions = Counter(
            "stream_learner_serving_shadow_predictions_total",
            "Shadow predictions by outcome: agree / disagree (the challenger's top class is / is not the "
            "champion's), compared (regression), failed (the challenger raised), dropped (the shadow queue "
            "was full: the champion's answer never waits for the shadow).",
            ["outcome"],
            registry=s,
        )

    def trainer_scores(self, model: str, summary: Callable[[], Mapping[str, float]]) -> None:
        """Set the rolling gauges of ``model`` from the learner's ``summary``, at most once a second."""
        now = time.monotonic()
        if self._rolling_at is not None and now - self._rolling_at < self.rolling_every_s:
            return
        self._rolling_at = now
        for key, value in summary().items():
            if key in self.trainer_rolling:
                self.trainer_rolling[key].labels(model=model).set(value)

    def trainer_challenge(self, model: str, scores: Callable[[], Mapping[str, float] | None]) -> None:
        """Set the challenge gauges from ``scores()`` (``None``: no challenger runs, the series are removed),
        at most once a second (``rolling_every_s``)."""
        now = time.monotonic()
        if self._challenge_at is not None and now - self._challenge_at < self.rolling_every_s:
            return
        self._challenge_at = now
        values = scores()
        if values is None:
            for label in self._challenged:
                self.trainer_challenge_accuracy.remove(label)
                self.trainer_challenge_accuracy_cumulative.remove(label)
            self._challenged = ()
            self.trainer_challenge_examples.set(0)
            return
        labels = {"champion": model, "challenger": f"{model}#challenger"}
        for side, label in labels.items():
            if f"{side}_accuracy" in values:
                self.trainer_challenge_accuracy.labels(model=label).set(values[f"{side}_accuracy_rolling"])
                self.trainer_challenge_accuracy_cumulative.labels(model=label).set(values[f"{side}_accuracy"])
        if "champion_accuracy" in values:
            self._challenged = tuple(labels.values())
        self.trainer_challenge_examples.set(values.get("examples", 0.0))

    def observe_consumer(self, role: str, consumer: Any) -> int:
        """One cycle of ``role``'s loop done: report its progress and set its consumer-lag gauge; the lag."""
        lag = self.health.role(role).observe(consumer)
        gauge = {"joiner": self.joiner_consumer_lag, "trainer": self.trainer_consumer_lag}.get(role)
        if gauge is not None:
            gauge.set(lag)
        return lag

    def serve(self, port: int, addr: str = "0.0.0.0") -> ThreadingHTTPServer:
        """Serve ``/metrics`` (Prometheus text) and ``/health`` (200 or 503, JSON) on ``port``, in the background."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # the stdlib's names
                pass  # a scrape every few seconds is not news

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # the stdlib's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(HTTPStatus.OK, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    healthy, body = metrics.health.status()
                    self._reply(
                        HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
                        json.dumps(body).encode(),
                        "application/json",
                    )
                else:
                    self._reply(HTTPStatus.NOT_FOUND, b"/metrics or /health\n", "text/plain")

        server = ThreadingHTTPServer((addr, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server
