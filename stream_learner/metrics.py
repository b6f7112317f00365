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
        self.sdk_events = Counter(
            "stream_learner_sdk_events_total",
            "SDK events by outcome: sent (acknowledged), failed (delivery error), dropped (buffer full).",
            ["type", "outcome"], registry=r)
        self.sdk_buffered_bytes = Gauge(
            "stream_learner_sdk_buffered_bytes", "Bytes waiting in the SDK buffer.", registry=r)
        self.kafka_commit_seconds = Histogram(
            "stream_learner_kafka_commit_seconds", "Time to commit consumer offsets.", registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` on ``port`` from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)
