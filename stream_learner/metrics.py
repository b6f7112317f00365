"""Prometheus metrics, held in a registry that is passed down (never the global one).

Names follow Prometheus conventions: ``stream_learner_`` prefix, base units,
``_total`` for counters, ``_seconds``/``_bytes`` suffixes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """All metrics of one process.

    >>> m = Metrics()
    >>> m.events_decoded.labels(type="prediction").inc()
    >>> m.registry.get_sample_value("stream_learner_events_decoded_total", {"type": "prediction"})
    1.0
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_decoded = Counter(
            "stream_learner_events_decoded_total", "Events decoded, by event type.", ["type"], registry=r)
        self.dead_letters = Counter(
            "stream_learner_dead_letters_total", "Records sent to the dead-letter topic, by stage and error kind.",
            ["stage", "kind"], registry=r)
        self.dead_letters_truncated = Counter(
            "stream_learner_dead_letters_truncated_total",
            "Dead letters sent with their value cut (too large to carry whole), by stage.", ["stage"], registry=r)
        self.dead_letters_unsendable = Counter(
            "stream_learner_dead_letters_unsendable_total",
            "Refused records the broker would not take even truncated: logged and skipped, by stage.",
            ["stage"], registry=r)
        self.sdk_events = Counter(
            "stream_learner_sdk_events_total",
            "SDK events by outcome: sent (acknowledged), failed (delivery error), dropped (buffer full).",
            ["type", "outcome"], registry=r)
        self.sdk_buffered_bytes = Gauge(
            "stream_learner_sdk_buffered_bytes", "Bytes waiting in the SDK buffer.", registry=r)
        self.kafka_commit_seconds = Histogram(
            "stream_learner_kafka_commit_seconds", "Time to commit consumer offsets.", registry=r)

        self.joiner_events = Counter(
            "stream_learner_joiner_events_total", "Input records read by the joiner, by topic.", ["topic"], registry=r)
        self.joiner_joins = Counter(
            "stream_learner_joiner_joins_total",
            "Join outcomes: labeled, unlabeled, late examples; early_label stored; orphan_label_dropped.",
            ["kind"], registry=r)
        self.joiner_duplicates = Counter(
            "stream_learner_joiner_duplicates_total", "Events that had already been applied.", registry=r)
        self.joiner_redis_seconds = Histogram(
            "stream_learner_joiner_redis_seconds", "Round-trip time of one join step in Redis.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.joiner_retries = Counter(
            "stream_learner_joiner_retries_total", "Retries while a dependency was unavailable.",
            ["dependency"], registry=r)
        self.joiner_watermark_lag = Gauge(
            "stream_learner_joiner_watermark_lag_seconds", "Wall clock minus the event-time watermark.", registry=r)
        self.joiner_consumer_lag = Gauge(
            "stream_learner_joiner_consumer_lag_records", "Records not yet read on the assigned partitions.",
            registry=r)

        self.trainer_examples = Counter(
            "stream_learner_trainer_examples_total", "Example records the trainer applied.", registry=r)
        self.trainer_loss = Gauge(
            "stream_learner_trainer_batch_loss", "Training loss of the last mini-batch.", registry=r)
        self.trainer_drifts = Counter(
            "stream_learner_trainer_drift_total", "Drift findings, by kind and detector.", ["kind", "detector"],
            registry=r)
        self.trainer_checkpoints = Counter(
            "stream_learner_trainer_checkpoints_total", "Checkpoints published.", registry=r)
        self.trainer_retries = Counter(
            "stream_learner_trainer_retries_total", "Retries while a dependency (its state store, Kafka) was down.",
            ["dependency"], registry=r)
        self.trainer_version = Gauge(
            "stream_learner_trainer_model_version", "Version of the last published checkpoint.", registry=r)

        self.serving_version = Gauge(
            "stream_learner_serving_model_version", "Version of the model a serving node serves (0: none yet).",
            registry=r)
        self.serving_swaps = Counter(
            "stream_learner_serving_swaps_total", "Models swapped in by the checkpoint subscriber.", registry=r)
        self.serving_swap_failures = Counter(
            "stream_learner_serving_swap_failures_total",
            "Checkpoints the subscriber refused or could not load (the last good model kept), by reason.",
            ["reason"], registry=r)
        self.serving_stale_manifests = Counter(
            "stream_learner_serving_stale_manifests_total",
            "Manifests ignored because their version is not newer than the one followed (replays).", registry=r)
        self.serving_swap_seconds = Histogram(
            "stream_learner_serving_swap_seconds", "Time from reading a manifest record to serving its model.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0), registry=r)
        self.serving_predictions = Counter(
            "stream_learner_serving_predictions_total", "Predictions served by `stream-learner serve`.", registry=r)
        self.serving_bad_requests = Counter(
            "stream_learner_serving_bad_requests_total", "Requests `stream-learner serve` refused with 400.",
            registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` on ``port`` from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)
