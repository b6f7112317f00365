"""One learning session: example records -> chunks -> learner -> drift policy -> checkpoints.

The live trainer (:mod:`~stream_learner.learn.trainer`) and replay
(:mod:`~stream_learner.replay.runner`) both run a :class:`LearningSession`;
they differ only in what they inject: where records come from (they call
:meth:`~LearningSession.add`), where checkpoints go (an
:class:`~stream_learner.checkpoint.output.Output`: the model topic, or a
directory), where dead letters and drift events go (:class:`Sinks`), the
state store, and the clock.

**Full chunks depend on the stream alone.** Items are learned in chunks of
exactly ``chunk_size``, in the order they were added; a partial chunk is
learned only when the driver says so (:meth:`~LearningSession.learn` with
``partial=True``: the live trainer once caught up and waited, a replay at the
end of its range). That call is where timing enters a live run, and nothing
else does (docs/architecture.md, "What is exact").

**A chunk**, in this order: decode each record (a refused one goes to the
dead-letter sink), :meth:`OnlineLearner.process
<stream_learner.learn.learner.OnlineLearner.process>` the examples (an example
whose label the model cannot use goes to the dead-letter sink), answer each
drift finding with the policy (:func:`apply_drift_policy`) and send its drift
event. After the chunk a checkpoint is taken when
``checkpoint_every_examples`` items were learned since the last one or a
policy asked for one; :meth:`~LearningSession.tick` also takes one every
``checkpoint_every_s`` of the clock, if set.

**A checkpoint**, in this order:

1. the sinks are flushed (the dead letters and drift events of the chunks it
   covers are durable);
2. the version moves to ``v``; the manifest of ``v`` (counts, metrics, drift
   state, feature spec, architecture, the input offsets applied, digest of
   the weights) is built;
3. the whole state (the learner's, ``v`` and its manifest, the source
   position, the items read but not learned yet, the driver's own state) is
   saved to the state store, atomically and durably;
4. only then are the weights and the signed manifest of ``v`` published;
5. ``on_published`` runs (the live trainer commits the applied offsets to
   Kafka, for monitoring only).

The position is, per partition, the record to read next and (``inside``) how
many of its examples were read already: a batch record
(:mod:`stream_learner.events.batch`) is many items, and a chunk may end in
one (:mod:`~stream_learner.learn.items`).

On start (:meth:`~LearningSession.restore`) the session loads the state,
republishes ``v`` if the output does not hold it yet (a crash between 3 and
4), and hands the driver the position to resume reading from; the items read
but not learned come back from the state, so the next chunks are the very
chunks an uninterrupted session learns. Versions have no gaps and no repeats,
and a serving node never sees a version the trainer could lose. A fresh
session numbers its first version after the newest one the output holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import msgspec
import structlog
import torch

from ..checkpoint.output import Output
from ..checkpoint.state import Snapshot, StateStore
from ..drift import (
    Action,
    Checkpoint,
    DriftFinding,
    DriftPolicy,
    LrBoost,
    OptimizerReset,
    PromoteChallengerIfBetter,
    StartChallenger,
)
from ..errors import EventError
from ..events import EXAMPLE, CheckpointManifest, Codec, ExampleEvent, Source, encode
from .frozen import Dtype
from .items import CorruptBatch, Item, Record, pack_item, unpack_item
from .learner import ChunkResult, OnlineLearner
from .manifest import build_manifest, layout_for, weights_bytes

log = structlog.get_logger(__name__)

#: Written into every session snapshot.
FORMAT = "stream-learner-session/1"


class Sinks(Protocol):
    """Where a session's side outputs go."""

    def dead_letter(self, record: Record | None, error: EventError) -> None:
        """A refused record (``None`` for an example that came decoded, with no record)."""
        ...

    def drift(
        self, finding: DriftFinding, actions: Sequence[Action], *, event_time: int, model_version: int | None
    ) -> None:
        """A drift finding and the actions the policy took."""
        ...

    def flush(self) -> None:
        """Return once everything sent is durable (before a checkpoint)."""
        ...


class CountingSinks:
    """Sinks that only count (a replay, or a test): nothing is sent anywhere."""

    def __init__(self) -> None:
        self.dead_letters = 0
        self.rejected = 0
        self.drifts = 0

    def dead_letter(self, record: Record | None, error: EventError) -> None:
        """Count a refusal: ``rejected`` for an unusable label, ``dead_letters`` for the rest."""
        if error.kind == "invalid_label":
            self.rejected += 1
        else:
            self.dead_letters += 1

    def drift(
        self, finding: DriftFinding, actions: Sequence[Action], *, event_time: int, model_version: int | None
    ) -> None:
        """Count a finding."""
        self.drifts += 1

    def flush(self) -> None:
        """Nothing to flush."""


@dataclass(frozen=True)
class Built:
    """A checkpoint about to be saved and published."""

    version: int
    manifest: CheckpointManifest
    tensors: dict[str, torch.Tensor]


def apply_drift_policy(learner: OnlineLearner, policy: DriftPolicy, finding: DriftFinding) -> list[Action]:
    """Decide the policy's actions for ``finding`` and apply those that act on the learner.

    Returns every action decided; a :class:`~stream_learner.drift.Checkpoint`
    is the session's to honour (it checkpoints after the chunk).
    """
    actions = policy.decide(finding, challenger_active=learner.challenger is not None)
    for action in actions:
        if isinstance(action, LrBoost):
            learner.boost_lr(action.factor, action.steps)
        elif isinstance(action, OptimizerReset):
            learner.reset_optimizer()
        elif isinstance(action, StartChallenger):
            learner.start_challenger()
        elif isinstance(action, PromoteChallengerIfBetter):
            promoted = learner.promote_challenger_if_better()
            log.info("challenger", promoted=promoted)
    return list(actions)


def source_of(name: str, offset: int) -> Source:
    """The :class:`~stream_learner.events.Source` of a position ``topic:partition``.

    >>> source_of("sl.examples:2", 41)
    Source(topic='sl.examples', partition=2, offset=41)
    """
    topic, _, partition = name.rpartition(":")
    return Source(topic, int(partition), offset)


class LearningSession:
    """Learns one lineage from items it is given and checkpoints it (see the module docstring).

    ``model`` is the name checkpoints are published under; ``chunk_bytes``
    the largest checkpoint chunk; ``max_event_bytes`` bounds a record's
    value. ``extra_state()`` returns the driver's own JSON-able state, saved
    in every snapshot; ``on_built`` runs before a checkpoint is saved,
    ``on_published`` after it is published, ``on_chunk`` after every chunk.
    """

    def __init__(
        self,
        learner: OnlineLearner,
        policy: DriftPolicy,
        *,
        model: str,
        output: Output,
        store: StateStore,
        sinks: Sinks,
        chunk_size: int,
        checkpoint_every_examples: int,
        checkpoint_every_s: float | None = None,
        chunk_bytes: int,
        max_event_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        on_built: Callable[[Built], None] | None = None,
        on_published: Callable[[CheckpointManifest], None] | None = None,
        on_chunk: Callable[[ChunkResult, int], None] | None = None,
        full_every: int = 0,
        checkpoint_dtype: Dtype = "float32",
    ) -> None:
        self.learner = learner
        self.policy = policy
        self.model = model
        self.output = output
        self.store = store
        self.sinks = sinks
        self.chunk_size = chunk_size
        self.checkpoint_every_examples = checkpoint_every_examples
        self.checkpoint_every_s = checkpoint_every_s
        self.chunk_bytes = chunk_bytes
        self.clock = clock
        self.extra_state = extra_state
        self.on_built = on_built
        self.on_published = on_published
        self.on_chunk = on_chunk
        self.full_every = full_every
        self.checkpoint_dtype = checkpoint_dtype
        self.full_requested = False  # the next checkpoint is full (request_full; not saved: a layout choice)
        self.decode = Codec(EXAMPLE.event_type, max_event_bytes).decode
        self.version = 0
        self.position: dict[str, int] = {}  # topic:partition -> next offset to read
        # topic:partition -> examples of the record at its position already read: a batch record read in
        # part (a chunk, and so a checkpoint, may end inside one). Absent: none.
        self.inside: dict[str, int] = {}
        self.pending: list[Item] = []  # read, not learned yet
        self.since_checkpoint = 0
        self.force_checkpoint = False
        self.last_checkpoint = clock()
        self.learned = 0  # items learned by this process (not saved)
        self.timings = {"learn": 0.0, "checkpoint": 0.0}  # seconds in this process (not saved)

    # -- start ---------------------------------------------------------------------

    def restore(
        self, *, snapshot: Snapshot | Literal["load"] | None = "load", legacy_topic: str = ""
    ) -> dict[str, Any] | None:
        """Load the saved state (``None`` if there is none: a fresh start); republish if lost.

        Returns the snapshot's meta, whose ``position`` the driver resumes
        reading from and which holds its own ``extra_state``. A trainer
        snapshot from before the session (offsets by partition) is read as
        offsets of ``legacy_topic``. A driver that looked at the snapshot
        first passes it (or ``None`` for a fresh start).
        """
        if isinstance(snapshot, str):
            snapshot = self.store.load()
        if snapshot is None:
            self.version = self.output.latest_version()
            return None
        meta = _upgrade(snapshot.meta, legacy_topic)
        self.learner.load_state_dict(snapshot.tensors, meta["learner"])
        self.version = int(meta["version"])
        self.position = {str(k): int(v) for k, v in meta["position"].items()}
        self.inside = {str(k): int(v) for k, v in meta.get("inside", {}).items()}
        self.pending = [unpack_item(x) for x in meta["pending"]]
        self.since_checkpoint = int(meta["since_checkpoint"])
        self.force_checkpoint = bool(meta["force_checkpoint"])
        if meta.get("manifest") is not None and self.output.latest_version() < self.version:
            # Crashed between saving the state and publishing it: publish now.
            log.info("session_republish", model=self.model, version=self.version)
            manifest = msgspec.convert(meta["manifest"], CheckpointManifest)
            weights = weights_bytes(snapshot.tensors, self.model, manifest.layout, self._frozen(manifest))
            self._published(self.output.publish(manifest, weights))
        log.info(
            "session_restored",
            model=self.model,
            version=self.version,
            position=self.position,
            pending=len(self.pending),
        )
        return meta

    # -- learning ------------------------------------------------------------------

    def add(
        self, items: Iterable[Item], position: Mapping[str, int] | None = None, inside: Mapping[str, int] | None = None
    ) -> None:
        """Take items in stream order; ``position`` is where reading goes on after them: per partition, the
        record to read next, of which ``inside`` says how many examples were read (none if absent)."""
        self.pending.extend(items)
        if position:
            self.position.update(position)
            for name in position:
                read = inside.get(name, 0) if inside else 0
                if read:
                    self.inside[name] = read
                else:
                    self.inside.pop(name, None)

    def learn(self, *, partial: bool = False) -> int:
        """Learn every full chunk pending (and, with ``partial``, the rest); the items learned."""
        size, n = self.chunk_size, 0
        while len(self.pending) >= size or (partial and self.pending):
            chunk = self.pending[:size]
            del self.pending[:size]
            self._learn_chunk(chunk)
            n += len(chunk)
            if self.force_checkpoint or self.since_checkpoint >= self.checkpoint_every_examples:
                self.checkpoint()
        return n

    def tick(self) -> None:
        """Checkpoint if ``checkpoint_every_s`` passed since the last one and something was learned."""
        every = self.checkpoint_every_s
        if every is not None and self.since_checkpoint and self.clock() - self.last_checkpoint >= every:
            self.checkpoint()

    def _learn_chunk(self, items: list[Item]) -> None:
        began = time.perf_counter()
        decode, sinks = self.decode, self.sinks
        examples: list[ExampleEvent] | None = None
        kept: list[Record | None] = []
        if not any(isinstance(item, (ExampleEvent, CorruptBatch)) for item in items):
            # The live trainer's chunk: examples' records alone, all of them decodable (the usual case), in one pass.
            try:
                examples = [decode(item.value) for item in cast("list[Record]", items)]
                kept = list(cast("list[Record]", items))
            except EventError:
                examples = None  # one is refused: the loop below sends it to the dead-letter sink
        if examples is None:
            examples, kept = [], []
            for item in items:
                if isinstance(item, ExampleEvent):
                    examples.append(item)
                    kept.append(None)
                    continue
                if isinstance(item, CorruptBatch):  # a batch record that does not parse: dead-lettered whole
                    sinks.dead_letter(item, item.error)
                    continue
                try:
                    examples.append(decode(item.value))
                    kept.append(item)
                except EventError as exc:
                    sinks.dead_letter(item, exc)
        result = self.learner.process(examples)
        for rejected in result.rejected:
            sinks.dead_letter(kept[rejected.index], EventError(rejected.kind, rejected.field, rejected.reason))
        if result.findings:  # the chunk's event time is only needed for drift events
            event_time = max((x.label_time or x.prediction_time for x in examples), default=0)
            for finding in result.findings:
                self.answer(finding, event_time)
        self.since_checkpoint += len(items)
        self.learned += len(items)
        self.timings["learn"] += time.perf_counter() - began
        if self.on_chunk is not None:
            self.on_chunk(result, len(items))

    def answer(self, finding: DriftFinding, event_time: int) -> list[Action]:
        """Apply the policy's actions for a finding, send its drift event; a checkpoint action is
        honoured after the chunk."""
        actions = apply_drift_policy(self.learner, self.policy, finding)
        if any(isinstance(action, Checkpoint) for action in actions):
            self.force_checkpoint = True
        self.sinks.drift(finding, actions, event_time=event_time, model_version=self.version or None)
        return actions

    # -- checkpoints -------------------------------------------------------------------

    def applied_offsets(self) -> dict[str, int]:
        """Per ``topic:partition``, the offset after the last record learned (the position, less
        the records pending)."""
        applied = dict(self.position)
        for item in self.pending:
            if not isinstance(item, ExampleEvent):
                name = f"{item.topic}:{item.partition}"
                applied[name] = min(applied.get(name, item.offset), item.offset)
        return applied

    def request_full(self) -> None:
        """Make the next checkpoint a full one (with a frozen base; see ``trainer_full_checkpoint_every``)."""
        self.full_requested = True

    def _frozen(self, manifest: CheckpointManifest) -> dict[str, torch.Tensor] | None:
        """The frozen parameters a full checkpoint on a base holds besides the state's tensors."""
        layout = manifest.layout
        return self.learner.frozen_tensors() if layout is not None and not layout.delta else None

    def checkpoint(self) -> CheckpointManifest:
        """Save the state, then publish it as the next version (see the module docstring)."""
        began = time.perf_counter()
        self.sinks.flush()
        version = self.version + 1
        tensors, learner_meta = self.learner.state_dict()
        layout = layout_for(
            self.learner, version, dtype=self.checkpoint_dtype, full_every=self.full_every, full=self.full_requested
        )
        frozen = self.learner.frozen_tensors() if layout is not None and not layout.delta else None
        weights = weights_bytes(tensors, self.model, layout, frozen)
        manifest = build_manifest(
            self.learner,
            model=self.model,
            version=version,
            parent=self.version or None,
            input_offsets=[source_of(n, o) for n, o in sorted(self.applied_offsets().items())],
            weights=weights,
            chunk_bytes=self.chunk_bytes,
            layout=layout,
        )
        self.full_requested = False
        self.version = version
        self.since_checkpoint = 0
        self.force_checkpoint = False
        self.last_checkpoint = self.clock()
        if self.on_built is not None:
            self.on_built(Built(version, manifest, tensors))
        self.save(manifest=manifest, state=(tensors, learner_meta))
        signed = self.output.publish(manifest, weights)
        self.timings["checkpoint"] += time.perf_counter() - began
        self._published(signed)
        return signed

    def _published(self, signed: CheckpointManifest) -> None:
        log.info("checkpoint_published", model=self.model, version=signed.version, metrics=signed.metrics)
        if self.on_published is not None:
            self.on_published(signed)

    def save(
        self,
        *,
        manifest: CheckpointManifest | None = None,
        state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    ) -> None:
        """Save the whole state; ``manifest`` only when the state is exactly that version's."""
        tensors, learner_meta = state if state is not None else self.learner.state_dict()
        meta = dict(self.extra_state() if self.extra_state is not None else {})
        meta.update(
            {
                "session": FORMAT,
                "version": self.version,
                "position": dict(self.position),
                "inside": dict(self.inside),
                "pending": [pack_item(x) for x in self.pending],
                "since_checkpoint": self.since_checkpoint,
                "force_checkpoint": self.force_checkpoint,
                "manifest": None if manifest is None else msgspec.json.decode(encode(manifest)),
                "learner": learner_meta,
            }
        )
        self.store.save(Snapshot(tensors, meta))

    def close(self) -> None:
        """Flush the sinks and release the output (the state is saved at checkpoints only)."""
        self.sinks.flush()
        self.output.close()


def _upgrade(meta: dict[str, Any], topic: str) -> dict[str, Any]:
    """A trainer snapshot from before the session (applied ``offsets`` by partition of ``topic``,
    nothing pending) in the session's layout."""
    if "session" in meta:
        return meta
    if "offsets" not in meta:
        raise ValueError("the saved state is neither a session's nor an older trainer's")
    position = {f"{topic}:{p}": int(o) for p, o in meta["offsets"].items()}
    return {**meta, "position": position, "pending": [], "since_checkpoint": 0, "force_checkpoint": False}
