"""``stream-learner optimize``: derive the serving variants of each new version, on another machine.

It follows the model topic; for each new verified version ``v`` of
``trainer_model`` it reads from the examples topic the recent window before
``v`` (the last ``variant_window`` examples of the model before ``v``'s
``input_offsets``) and the held-out examples after it (the first
``variant_heldout_examples`` labeled ones, or all up to the next version's
offsets once the next version is out), then runs the trainer's very
:func:`~stream_learner.optimize.hook.derive` and publishes what passes as
``<model>#<variant>`` version ``v``, signed with ``trainer_signing_key``.
Versions whose variants are already published are skipped, so restarts
and a trainer that derives the same variants do not publish twice.

**Same outputs as the trainer's hook** when the examples topic has one
partition (the default): the window and the held-out examples are then the
very examples the trainer learned, in its order (duplicates the joiner
delivered are dropped by example id within what the role reads). With
several partitions, examples are taken in (partition, offset) order, which
may differ from the order the trainer interleaved them. On batch records (``examples_format = "batch"``) a version's
``input_offsets`` name the first record it did not wholly learn, so its
held-out examples may begin with up to one record's examples the version
learned. The ``student``
needs the teacher's whole stream: it is the trainer's (and replay's) only.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from ..bus import TopicPartition, make_consumer
from ..checkpoint.fetch import record_header
from ..checkpoint.output import TopicOutput
from ..checkpoint.publish import H_MODEL, H_TYPE, TYPE_MANIFEST
from ..checkpoint.reader import load_manifest_record, make_reader_consumer
from ..checkpoint.signing import load_private_key, load_public_key
from ..config import Settings
from ..errors import ConfigError, EventError
from ..events import EXAMPLE, CheckpointManifest, ExampleEvent, class_name
from ..events.batch import record_values
from ..metrics import Metrics
from .hook import Outcome, count, derive, gate_config, lineage, recipes, variant_manifest
from .variants import Parent, Servable
from .window import RecentExamples, Window

log = structlog.get_logger(__name__)

__all__ = ["Optimizer"]


@dataclass
class _Version:
    manifest: CheckpointManifest
    parent: Parent


class Optimizer:
    """The optimize role for ``settings.trainer_model`` (see the module docstring); ``step()`` is one pass."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, poll_timeout_ms: int = 500) -> None:
        if not settings.trainer_signing_key:
            raise ConfigError("trainer_signing_key is not set: the optimize role signs the variants it publishes")
        if "student" in settings.trainer_variants:
            raise ConfigError(
                "the student is trained alongside the teacher: the trainer derives it "
                "(trainer_variants on the trainer), not the optimize role"
            )
        if not settings.trainer_variants:
            raise ConfigError("trainer_variants is empty: name the variants to derive (int8, pruned, sparse)")
        if any(":" in f for f in settings.trainer_features) or settings.trainer_collate:
            # The window and the gate read numbers only, as the trainer's variants do (learn.build).
            raise ConfigError(
                "trainer_variants need a spec of numeric features: the variants' window reads numbers only "
                f"(features {list(settings.trainer_features)})"
            )
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.model = settings.trainer_model
        self.recipes = recipes(settings)
        self.gate = gate_config(settings)
        self.poll_timeout_ms = poll_timeout_ms
        self.private_key = load_private_key(settings.trainer_signing_key)
        self.keys = [load_public_key(p) for p in settings.serving_public_keys] or [self.private_key.public_key()]
        self.outputs = {
            r["name"]: TopicOutput(settings, lineage(self.model, r["name"]), self.private_key) for r in self.recipes
        }
        self.done = min(o.latest_version() for o in self.outputs.values())  # every variant of <= done is out
        self.follower = make_reader_consumer(settings)
        self.loader = make_reader_consumer(settings)
        self.examples = make_consumer(settings, None)
        parts = self.follower.partitions_for_topic(settings.topic_models) or {0}
        self.follower.assign([TopicPartition(settings.topic_models, p) for p in sorted(parts)])
        self.follower.seek_to_beginning()
        self.versions: list[_Version] = []  # loaded, not derived yet, oldest first
        self.outcomes: list[Outcome] = []

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set, then close."""
        log.info("optimize_started", model=self.model, variants=[r["name"] for r in self.recipes], done=self.done)
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> list[Outcome]:
        """Read new manifests; derive the variants of every version whose held-out examples are in."""
        batch = self.follower.poll(timeout_ms=self.poll_timeout_ms)
        want = self.model.encode()
        for _, records in sorted(batch.items(), key=lambda kv: kv[0].partition):
            for record in records:
                if record_header(record, H_TYPE) != TYPE_MANIFEST or record_header(record, H_MODEL) != want:
                    continue
                self._load(record)
        self.metrics.health.role("optimize").observe(self.follower)  # progress, for /health
        out: list[Outcome] = []
        while self.versions:
            following = self.versions[1].manifest if len(self.versions) > 1 else None
            heldout = self._heldout(self.versions[0].manifest, following)
            if heldout is None:
                break
            out.extend(self._derive(self.versions.pop(0), heldout))
        return out

    def _load(self, record: Any) -> None:
        try:
            checkpoint = load_manifest_record(self.loader, record, self.keys)
            from ..serving.model import load_served_model  # the node's loader: the same checks and build

            served = load_served_model(checkpoint)
        except Exception as exc:  # noqa: BLE001 - a version that does not load has no variants
            log.warning("optimize_parent_refused", offset=record.offset, error=str(exc))
            return
        m = checkpoint.manifest
        if m.version <= self.done or any(v.manifest.version >= m.version for v in self.versions):
            return
        self.versions.append(_Version(m, Parent(self.model, m.version, Servable(served.spec, checkpoint.tensors))))

    # -- the examples ---------------------------------------------------------------------------

    def _read(self, tp: TopicPartition, lo: int, hi: int) -> list[Any]:
        if hi <= lo:
            return []
        self.examples.assign([tp])
        self.examples.seek(tp, lo)
        out: list[Any] = []
        while self.examples.position(tp) < hi:
            batch = self.examples.poll(timeout_ms=1000, max_records=max(1, hi - self.examples.position(tp)))
            if not batch and self.examples.position(tp) >= (self.examples.end_offsets([tp])[tp]):
                break
            out.extend(r for r in batch.get(tp, ()) if lo <= r.offset < hi)
        return out

    def _examples(self, bounds: dict[TopicPartition, tuple[int, int]]) -> list[ExampleEvent]:
        """This model's usable examples in ``[lo, hi)`` of each partition, (partition, offset) order."""
        out: list[ExampleEvent] = []
        seen: set[str] = set()
        for tp in sorted(bounds, key=lambda t: t.partition):
            for record in self._read(tp, *bounds[tp]):
                try:
                    values = record_values(record)  # either format: one example, or a batch's
                except EventError:
                    continue
                for value in values:
                    try:
                        ex = EXAMPLE.decode(value)
                    except EventError:
                        continue
                    if ex.model != self.model or ex.example_id in seen or self._label(ex) is None:
                        continue
                    seen.add(ex.example_id)
                    out.append(ex)
        return out

    def _label(self, ex: ExampleEvent) -> float | None:
        if ex.kind == "unlabeled":
            return float("nan")
        if self.settings.trainer_task == "regression":
            return None if isinstance(ex.label, str) or ex.label is None else float(ex.label)
        classes = [class_name(c) for c in self.settings.trainer_classes]
        name = class_name(ex.label) if ex.label is not None else None
        return float(classes.index(name)) if name in classes else None

    def _window(self, examples: list[ExampleEvent], capacity: int) -> RecentExamples:
        w = RecentExamples(self.settings.trainer_features, capacity)
        labels = [self._label(ex) for ex in examples]
        w.add([ex.features for ex in examples], [math.nan if y is None else y for y in labels])
        return w

    def _offsets(self, manifest: CheckpointManifest) -> dict[TopicPartition, int]:
        return {
            TopicPartition(s.topic, s.partition): s.offset
            for s in manifest.input_offsets
            if s.topic == self.settings.topic_examples
        }

    def _heldout(self, manifest: CheckpointManifest, following: CheckpointManifest | None) -> Window | None:
        """The held-out examples of ``manifest``'s version, or ``None`` while they are not all in."""
        start = self._offsets(manifest)
        if following is not None:
            end = self._offsets(following)
        else:
            end = self.examples.end_offsets(list(start)) if start else {}
        examples = self._examples({tp: (o, end.get(tp, o)) for tp, o in start.items()})
        window = self._window(examples, max(1, len(examples))).window()
        labeled = np.flatnonzero(~np.isnan(window.labels))
        if len(labeled) >= self.gate.heldout_examples:
            return window.head(int(labeled[self.gate.heldout_examples - 1]) + 1)
        return window if following is not None else None

    def _derive(self, version: _Version, heldout: Window) -> list[Outcome]:
        m = version.manifest
        capacity = self.settings.variant_window
        # Read back twice the window: duplicates and other models' examples are dropped.
        before = self._examples({tp: (max(0, o - 2 * capacity), o) for tp, o in self._offsets(m).items()})
        window = self._window(before, capacity).window()
        outcomes = derive(version.parent, self.recipes, window, heldout, self.gate)
        for outcome in outcomes:
            if outcome.verdict.publish:
                output = self.outputs[outcome.name]
                if m.version > output.latest_version():
                    manifest, weights = variant_manifest(m, outcome, self.settings.trainer_chunk_bytes)
                    outcome.manifest = output.publish(manifest, weights)
            count(self.metrics, outcome)
        self.done = m.version
        self.outcomes.extend(outcomes)
        return outcomes

    def close(self) -> None:
        """Close the clients."""
        for output in self.outputs.values():
            output.close()
        for consumer in (self.follower, self.loader, self.examples):
            consumer.close()
