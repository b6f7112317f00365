"""The serving side's own metrics (on the process's registry) and a limit on repeated log lines.

The metrics of :class:`~stream_learner.metrics.Metrics` say what a node
serves; these say what it refused and what it is holding: the floor, the
start scan, records too large to receive, the chunk window, the HTTP
node's connections and refusals. They are registered once per registry
(:func:`serving_metrics`), so a subscriber and a node sharing a
``Metrics`` share them.

An attacker who can write the model topic can make a node refuse 200,000
records; :class:`LogLimiter` keeps that from becoming 200,000 log lines:
per key, the first few in a period are logged, the rest counted and
summed up in the next line that is.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..metrics import Metrics

__all__ = ["LogLimiter", "ServingMetrics", "serving_metrics"]


@dataclass(frozen=True)
class ServingMetrics:
    """See the README's metrics table."""

    floor_version: Gauge
    highest_verified_version: Gauge
    skipped_records: Counter
    window_records: Gauge
    window_bytes: Gauge
    scan_records: Gauge
    http_connections: Gauge
    http_inflight: Gauge
    http_refused: Counter
    registry_seq: Gauge
    registry_pin_version: Gauge
    alias_version: Gauge


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, ServingMetrics] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def serving_metrics(metrics: Metrics) -> ServingMetrics:
    """The serving metrics on ``metrics.registry``, made on first use."""
    with _LOCK:
        found = _BY_REGISTRY.get(metrics.registry)
        if found is not None:
            return found
        r = metrics.registry
        made = ServingMetrics(
            floor_version=Gauge(
                "stream_learner_serving_floor_version",
                "The highest good version this node knows; it never serves a lower one.",
                registry=r,
            ),
            highest_verified_version=Gauge(
                "stream_learner_serving_highest_verified_version",
                "The highest version with a valid signature seen on the topic.",
                registry=r,
            ),
            skipped_records=Counter(
                "stream_learner_serving_skipped_records_total",
                "Model-topic records larger than the receive limit, skipped.",
                registry=r,
            ),
            window_records=Gauge(
                "stream_learner_serving_window_records", "Chunk records the follower holds.", registry=r
            ),
            window_bytes=Gauge("stream_learner_serving_window_bytes", "Bytes of the chunk records held.", registry=r),
            scan_records=Gauge(
                "stream_learner_serving_start_scan_records",
                "Records the start scan read back from the end of the topic.",
                registry=r,
            ),
            http_connections=Gauge("stream_learner_serving_http_connections", "Open HTTP connections.", registry=r),
            http_inflight=Gauge(
                "stream_learner_serving_http_inflight",
                "Requests being decoded and predicted, or waiting for a worker.",
                registry=r,
            ),
            http_refused=Counter(
                "stream_learner_serving_http_refused_total",
                "Connections and requests the HTTP node refused or cut, by reason.",
                ["reason"],
                registry=r,
            ),
            registry_seq=Gauge(
                "stream_learner_serving_registry_seq",
                "Sequence number of the model's registry record applied (0: none).",
                registry=r,
            ),
            registry_pin_version=Gauge(
                "stream_learner_serving_registry_pin_version",
                "The version the registry pins fleet-wide (0: no pin).",
                registry=r,
            ),
            alias_version=Gauge(
                "stream_learner_serving_alias_version",
                "The version the alias this node follows names (0: not set).",
                ["alias"],
                registry=r,
            ),
        )
        _BY_REGISTRY[r] = made
        return made


class LogLimiter:
    """At most ``burst`` lines per key per ``period_s``; the rest are counted.

    >>> limiter = LogLimiter(burst=2, period_s=60)
    >>> [limiter.allow("signature") for _ in range(4)]
    [0, 0, None, None]
    """

    def __init__(self, burst: int = 10, period_s: float = 60.0) -> None:
        self.burst, self.period_s = burst, period_s
        self._state: dict[str, list[float]] = {}  # key -> [period start, lines, suppressed]
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """``None``: do not log this one. Else log it, with the number suppressed since the last line logged."""
        now = time.monotonic()
        with self._lock:
            start, lines, suppressed = self._state.get(key, (now, 0, 0))
            if now - start >= self.period_s:
                start, lines = now, 0
            if lines >= self.burst:
                self._state[key] = [start, lines, suppressed + 1]
                return None
            self._state[key] = [start, lines + 1, 0]
            return int(suppressed)
