"""Watching the run from outside: what the pipeline's topics say, and the live progress line.

:class:`Monitor` reads the examples, model and drift topics from the
beginning: the join by kind, the checkpoints' manifests (the model's and its
serving variants', apart), the drift events.
:class:`Progress` prints one status line a second from the application's
responses and the monitor's counts.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from ...bus import TopicPartition, make_consumer
from ...checkpoint.publish import H_TYPE, TYPE_MANIFEST
from ...config import Settings
from ...errors import EventError
from ...events import DRIFT, MANIFEST, ExampleEvent
from ...events.batch import record_examples
from .app import MODEL, PROBE, DemoConfig, Served

log = structlog.get_logger(__name__)


@dataclass
class Observed:
    """What the monitor read from the topics."""

    examples: Counter[str] = field(default_factory=Counter)
    example_at: dict[str, tuple[int, int]] = field(default_factory=dict)  # label event id -> (partition, offset)
    examples_end: dict[int, int] = field(default_factory=dict)  # partition -> one past the last example read
    manifests: dict[int, Any] = field(default_factory=dict)  # version -> manifest (the demo model's own)
    # Variant name -> version -> (manifest, when the monitor read it): when a node following the
    # variant could have had it at the earliest (a variant of the demo model is a few kB).
    variants: dict[str, dict[int, tuple[Any, float]]] = field(default_factory=dict)
    drift: list[Any] = field(default_factory=list)
    probed: bool = False  # the warm-up probe came out of the joiner
    example_ids: set[str] = field(default_factory=set)
    duplicates: int = 0  # examples re-emitted (at-least-once), not counted again


class Monitor(threading.Thread):
    """Reads the examples, model and drift topics from the beginning until stopped.

    ``seen`` is updated under ``lock``; ``stop`` ends the thread.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="demo-monitor", daemon=True)
        self.settings = settings
        self.seen = Observed()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        s = self.settings
        consumer = make_consumer(s, None)
        tps = [
            TopicPartition(t, p)
            for t in (s.topic_examples, s.topic_models, s.topic_drift)
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        try:
            while not self.stop.is_set():
                for tp, records in consumer.poll(timeout_ms=200).items():
                    with self.lock:
                        for r in records:
                            self._take(tp.topic, r)
        finally:
            consumer.close()

    def _take(self, topic: str, record: Any) -> None:
        s, seen = self.settings, self.seen
        try:
            if topic == s.topic_examples:
                seen.examples_end[record.partition] = record.offset + 1
                for ex in record_examples(record):  # either format: one example, or a batch's
                    self._example(ex, record)
            elif topic == s.topic_models:
                if dict(record.headers or ()).get(H_TYPE) == TYPE_MANIFEST:
                    m = MANIFEST.decode(record.value)
                    # A variant is version v of its own lineage (demo#int8): never the parent's v.
                    if m.variant is not None and m.variant.parent_model == MODEL:
                        seen.variants.setdefault(m.variant.name, {})[m.version] = (m, time.time())
                    elif m.model == MODEL:
                        seen.manifests[m.version] = m
            else:
                seen.drift.append(DRIFT.decode(record.value))
        except EventError as exc:  # the pipeline's own topics: would be a bug, so say it
            log.error("demo_monitor_bad_record", topic=topic, offset=record.offset, error=str(exc))

    def _example(self, ex: ExampleEvent, record: Any) -> None:
        seen = self.seen
        if ex.model == PROBE:
            seen.probed = True
            return
        # At-least-once: a re-emitted example (same id) counts once, and apart.
        if ex.example_id in seen.example_ids:
            seen.duplicates += 1
            return
        seen.example_ids.add(ex.example_id)
        seen.examples[ex.kind] += 1
        if ex.label_event_id is not None:
            seen.example_at[ex.label_event_id] = (record.partition, record.offset)


class Progress(threading.Thread):
    """One status line a second: requests, served accuracy, model version, drift."""

    def __init__(
        self,
        config: DemoConfig,
        served: list[Served | None],
        monitor: Monitor,
        t0: float,
        drift_time: list[float],
        *,
        enabled: bool,
    ) -> None:
        super().__init__(name="demo-progress", daemon=True)
        self.config, self.served, self.monitor, self.t0 = config, served, monitor, t0
        self.drift_time = drift_time
        self.enabled = enabled
        self.stop = threading.Event()
        self.tty = sys.stderr.isatty()

    def run(self) -> None:
        ticks = 0
        while not self.stop.wait(1.0):
            ticks += 1
            # On a terminal the line rewrites itself each second; in a log, one every 5 s.
            if self.enabled and (self.tty or ticks % 5 == 0):
                print(
                    ("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n", file=sys.stderr, flush=True
                )
        if self.enabled and self.tty:
            print(file=sys.stderr)

    def line(self) -> str:
        """The current status line."""
        done = [s for s in self.served if s is not None]
        recent = done[-self.config.rolling_window :]
        acc = sum(s.correct for s in recent) / len(recent) if recent else float("nan")
        drift_ms = self.drift_time[0] * 1000 if self.drift_time else None
        with self.monitor.lock:
            seen = self.monitor.seen
            examples = sum(seen.examples.values())
            # Label-free detectors also fire while the first model learns: only later ones count.
            drifts = [d for d in seen.drift if d.kind == "drift" and drift_ms is not None and d.event_time >= drift_ms]
        drift = "after the drift" if self.drift_time else "before the drift"
        if drifts:
            drift += f", detected by {drifts[0].detector}"
        version = done[-1].version if done else "-"
        return (
            f"[{time.time() - self.t0:5.1f}s] served {len(done):>6,}/{self.config.requests:,}  "
            f"examples {examples:>6,}  served acc (last {self.config.rolling_window}) {acc:.3f}  model v{version}  "
            f"{drift}   "
        )
