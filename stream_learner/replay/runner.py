"""One replay: a closed range of the topics -> join -> learner -> a new model lineage.

See the package docstring for the semantics. The learning itself is a
:class:`~stream_learner.learn.session.LearningSession`, the live trainer's:
this module is the driver that feeds it a range and saves where it is.

**The order of one replay** (:meth:`Replay.run`):

1. load the replay's snapshot (``<replay_state_dir>/<id>/state``); a fresh
   replay resolves its ranges (:mod:`.ranges`) and records them, a resumed
   one takes the recorded ranges and refuses to go on if the settings that
   shape the result changed;
2. read the ranges in merge order (:mod:`.merge`); with ``source="events"``
   feed every ``replay_join_step_events`` events to one step of the real
   join script (:class:`~stream_learner.join.store.RedisJoinStore`) under a
   private key prefix, whose emissions are the examples; with
   ``source="examples"`` the records are the examples;
3. hand the examples to the session, which learns in chunks of exactly
   ``trainer_batch_size`` and checkpoints as the live trainer does (never by
   the clock): save the snapshot, then publish the version under the
   replay's lineage;
4. at the end of the ranges, learn the last partial chunk, checkpoint, mark
   the snapshot done and delete the private join keys.

Interrupted (``stop`` set, Ctrl-C), it saves a snapshot at the next step
boundary and returns; run again with the same id, it continues and ends
with the very weights an uninterrupted run ends with.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import torch

from ..bus import make_consumer
from ..checkpoint.codec import sha256_hex
from ..checkpoint.output import DirectoryOutput, Output, TopicOutput
from ..checkpoint.signing import load_private_key
from ..checkpoint.state import DirectoryStateStore
from ..config import Settings
from ..errors import ConfigError
from ..events import ExampleEvent
from ..learn.build import build_learner
from ..learn.items import expand
from ..learn.learner import ChunkResult, OnlineLearner
from ..learn.manifest import weights_bytes
from ..learn.session import FORMAT as SESSION_FORMAT
from ..learn.session import Built, CountingSinks, LearningSession
from ..optimize.hook import SessionVariants
from .errors import ReplayError
from .join import ReplayJoin
from .merge import MergedReader
from .plan import ReplayPlan, result_fingerprint
from .progress import Progress
from .ranges import Ranges, parse_bound, resolve_ranges

__all__ = ["Replay", "ReplayPlan", "result_fingerprint"]

log = structlog.get_logger(__name__)


class Replay:
    """One replay (see the module docstring). ``run()`` returns its summary (a JSON-able dict).

    ``stop`` interrupts it at the next step boundary (state saved, resumable);
    ``poll_records`` and ``fetch_max_bytes`` size the fetches (they do not
    change the result); ``on_chunk`` is called after every chunk learned and
    ``on_examples`` with every join step's examples (events source; not
    during the rebuild of a resumed replay's join state).
    """

    def __init__(
        self,
        settings: Settings,
        plan: ReplayPlan,
        *,
        stop: threading.Event | None = None,
        progress: bool = True,
        poll_records: int | None = None,
        fetch_max_bytes: int | None = None,
        on_chunk: Callable[[Replay], None] | None = None,
        on_examples: Callable[[list[ExampleEvent]], None] | None = None,
    ) -> None:
        if not settings.trainer_signing_key:
            raise ConfigError("trainer_signing_key is not set: a replay signs its checkpoints like the trainer")
        self.settings = settings
        self.plan = plan
        self.lineage = plan.lineage_name(settings)
        if self.lineage == settings.trainer_model and not plan.overwrite_live:
            raise ConfigError(
                f"lineage {self.lineage!r} is the live model's name: pass --overwrite-live to "
                "publish the replay as the live lineage's next versions"
            )
        self.stop = stop or threading.Event()
        self.show_progress = progress
        self.poll_records = poll_records or settings.joiner_max_poll_records
        self.fetch_max_bytes = fetch_max_bytes
        self.on_chunk = on_chunk
        self.on_examples = on_examples
        self.private_key = load_private_key(settings.trainer_signing_key)
        self.dir = Path(settings.replay_state_dir) / plan.replay_id
        self.store = DirectoryStateStore(self.dir / "state")
        self.fingerprint = result_fingerprint(settings, plan)
        torch.set_num_threads(settings.trainer_torch_threads)
        learner, policy = build_learner(settings)
        self.sinks = CountingSinks()
        self.session = LearningSession(
            learner,
            policy,
            model=self.lineage,
            output=self._output(),
            store=self.store,
            sinks=self.sinks,
            chunk_size=settings.trainer_batch_size,
            checkpoint_every_examples=settings.trainer_checkpoint_every_examples,
            chunk_bytes=settings.trainer_chunk_bytes,
            max_event_bytes=settings.max_event_bytes,
            full_every=settings.trainer_full_checkpoint_every,
            checkpoint_dtype=settings.trainer_checkpoint_dtype,
            extra_state=self._extra_state,
            on_built=self._built,
            on_chunk=self._chunk,
        )
        # Serving variants of every version, as the live trainer derives them (trainer_variants).
        self.variants = SessionVariants.from_settings(settings, output_for=self._output)
        if self.variants is not None:
            self.variants.attach(self.session)
        self.prefix = "sl:{replay-" + plan.replay_id + "}:"
        # The replay's own state (saved with the session's in every snapshot).
        self.ranges = Ranges({})
        self.steps_done = 0
        self.examples = 0
        self.event_dead_letters = 0  # prediction and label events refused while joining, as saved
        self.join: ReplayJoin | None = None  # while an events replay runs
        self.published: list[dict[str, Any]] = []
        self.done = False
        self.started_at = time.time()
        self.seconds = 0.0

    @property
    def learner(self) -> OnlineLearner:
        """The session's learner."""
        return self.session.learner

    @property
    def version(self) -> int:
        """The last version of the lineage checkpointed."""
        return self.session.version

    @property
    def counts(self) -> dict[str, int]:
        """Records read, examples learned, dead letters, rejected examples, drift findings."""
        events_dead = self.join.dead_letters if self.join is not None else self.event_dead_letters
        return {
            "records_read": self._read_so_far(),
            "dead_letters": events_dead + self.sinks.dead_letters,
            "examples": self.examples,
            "rejected": self.sinks.rejected,
            "drifts": self.sinks.drifts,
        }

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent joining, learning and checkpointing in this process."""
        return {"join": self.join.seconds if self.join is not None else 0.0, **self.session.timings}

    # -- the run ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Replay to the end of the ranges (or until ``stop``); return the summary."""
        began = time.monotonic()
        try:
            resumed = self._load()
            if self.done:
                log.info("replay_already_done", replay_id=self.plan.replay_id)
                return self.summary()
            if not resumed:
                # Pin the resolved ranges at once: a replay killed before its first checkpoint
                # resumes over the same range (`end` does not move on).
                self.session.save()
            consumer = make_consumer(
                self.settings,
                group_id=None,
                max_poll_records=self.poll_records,
                **({"fetch_max_bytes": self.fetch_max_bytes} if self.fetch_max_bytes else {}),
            )
            try:
                if self.plan.source == "events":
                    finished = self._run_events(consumer, resumed)
                else:
                    finished = self._run_examples(consumer)
            finally:
                consumer.close()
            self.seconds += time.monotonic() - began
            if finished:
                self._finish()
            else:
                self.session.save()
                log.info("replay_interrupted", replay_id=self.plan.replay_id, records=self._read_so_far())
        finally:
            self.session.close()
            if self.variants is not None:
                self.variants.close()
        summary = self.summary()
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        return summary

    def _output(self, lineage: str | None = None) -> Output:
        """Where the replay's lineage (or one of its variant lineages) is published."""
        if self.plan.output_dir:
            return DirectoryOutput(
                self.plan.output_dir, lineage or self.lineage, self.private_key, self.settings.trainer_chunk_bytes
            )
        return TopicOutput(self.settings, lineage or self.lineage, self.private_key)

    def _topics(self) -> list[str]:
        s = self.settings
        return [s.topic_predictions, s.topic_labels] if self.plan.source == "events" else [s.topic_examples]

    # -- examples -------------------------------------------------------------------------

    def _run_examples(self, consumer: Any) -> bool:
        """Train on the examples topic's range; False if stopped before its end."""

        def decode(record: Any) -> tuple[int, Any]:
            return record.timestamp, record

        session = self.session
        reader = MergedReader(
            consumer, self.ranges.ranges, decode, positions=session.position, poll_records=self.poll_records
        )
        progress = self._progress()
        batch, pending = self.settings.trainer_batch_size, session.pending
        for _, _, record in reader.read():
            # One item per example (a batch record's examples, stream_learner.learn.items): a chunk may end
            # inside a batch record, whose other examples then wait in the snapshot's pending items, the
            # position being past the record.
            if record.headers:
                pending.extend(expand([record]))
            else:
                pending.append(record)
            if len(pending) >= batch:
                session.add((), reader.positions)
                session.learn()
                progress.update(self._read_so_far())
                if self.stop.is_set():
                    progress.close(self._read_so_far())
                    return False
        session.add((), reader.positions)
        progress.close(self._read_so_far())
        return True

    # -- events -> join -> examples ---------------------------------------------------------

    def _run_events(self, consumer: Any, resumed: bool) -> bool:
        """Join and train on the prediction and label topics' ranges; False if stopped before their end."""
        session = self.session
        parts = [n for n, (a, b) in self.ranges.ranges.items() if a < b]
        join = self.join = ReplayJoin(self.settings, self.prefix, parts)
        try:
            # Rebuild the join state from the range start: Redis state is not in the snapshot.
            join.delete_keys()
            reader = MergedReader(consumer, self.ranges.ranges, join.decode, poll_records=self.poll_records)
            steps = join.steps(reader)
            saved_positions = dict(session.position)
            for k in range(self.steps_done):
                events = next(steps, None)
                if events is None:
                    raise ReplayError("the inputs changed since the replay was interrupted (fewer events)")
                join.send(events, k)
                join.receive()
            if resumed and self.steps_done and dict(reader.positions) != saved_positions:
                raise ReplayError(
                    f"rebuilding the join state ended at {reader.positions}, the snapshot says {saved_positions}"
                )
            progress = self._progress()
            for events in steps:
                after = dict(reader.positions)
                # Redis runs this step while the learner takes the previous steps' examples (its own
                # process: real parallelism). The learning order is the same as one step after the other.
                join.send(events, self.steps_done)
                session.learn()
                if self.stop.is_set():
                    join.receive()  # dropped: the snapshot ends before this step, the resume rebuilds Redis
                    progress.close(self._read_so_far())
                    return False
                examples = join.receive()
                self.steps_done += 1
                if self.on_examples is not None:
                    self.on_examples(examples)
                session.add(examples, after)
                progress.update(self._read_so_far())
            session.learn()
            session.add((), reader.positions)
            progress.close(self._read_so_far())
            if self.plan.close_windows:
                closed = join.close_windows(self.steps_done)
                if self.on_examples is not None:
                    self.on_examples(closed)
                session.add(closed)
                session.learn()
            join.delete_keys()
            return True
        finally:
            join.close()

    # -- the session's hooks ----------------------------------------------------------------

    def _chunk(self, result: ChunkResult, n: int) -> None:
        self.examples += n
        if self.on_chunk is not None:
            self.on_chunk(self)

    def _built(self, built: Built) -> None:
        """Record the version in the replay's list before the session saves the state that holds it."""
        self.published.append(
            {
                "version": built.version,
                "sha256": built.manifest.weights.sha256,
                # The weights file carries the model name in its metadata, so a lineage's digest
                # differs from live's even for equal tensors; this one does not.
                "sha256_as_live": sha256_hex(
                    weights_bytes(
                        built.tensors,
                        self.settings.trainer_model,
                        built.manifest.layout,
                        self.session.learner.frozen_tensors() if built.manifest.layout is not None else None,
                    )
                ),
                "examples": self.examples,
            }
        )
        log.info(
            "replay_checkpoint", lineage=self.lineage, version=built.version, sha256=built.manifest.weights.sha256[:16]
        )

    def _finish(self) -> None:
        # The range's end: the last partial chunk, as the live trainer cuts it once caught up.
        self.session.learn(partial=True)
        if self.session.since_checkpoint or not self.published:
            self.session.checkpoint()
        if self.variants is not None:
            self.variants.decide()  # the last version's: nothing after it is held out, so it is counted skipped
        self.done = True
        self.session.save()
        log.info("replay_done", replay_id=self.plan.replay_id, lineage=self.lineage, version=self.version)

    # -- state ------------------------------------------------------------------------------

    def _read_so_far(self) -> int:
        position = self.session.position
        return sum(position.get(n, a) - a for n, (a, _) in self.ranges.ranges.items())

    def _progress(self) -> Progress:
        return Progress(
            f"replay {self.plan.replay_id}", self.ranges.total(), enabled=self.show_progress, done=self._read_so_far()
        )

    def _extra_state(self) -> dict[str, Any]:
        return {
            "format": "stream-learner-replay/2",
            "plan": self.plan.__dict__,
            "fingerprint": self.fingerprint,
            "lineage": self.lineage,
            "ranges": self.ranges.to_json(),
            "steps_done": self.steps_done,
            "counts": self.counts,
            "published": self.published,
            "done": self.done,
            "seconds": self.seconds,
            "started_at": self.started_at,
        }

    def _load(self) -> bool:
        """Restore the snapshot if there is one (True), else resolve the ranges (False)."""
        snapshot = self.store.load()
        if snapshot is None:
            consumer = make_consumer(self.settings, group_id=None)
            try:
                self.ranges = resolve_ranges(
                    consumer, self._topics(), parse_bound(self.plan.start), parse_bound(self.plan.end)
                )
            finally:
                consumer.close()
            self.session.restore(snapshot=None)  # a fresh lineage starts at 0, a live one after its newest
            self.session.position = {n: a for n, (a, _) in self.ranges.ranges.items()}
            log.info("replay_ranges", replay_id=self.plan.replay_id, ranges=self.ranges.ranges, times=self.ranges.times)
            return False
        meta = snapshot.meta
        if meta.get("session") != SESSION_FORMAT:
            raise ReplayError(
                f"replay {self.plan.replay_id!r} was saved by an older stream-learner; start a new replay id"
            )
        if meta.get("fingerprint") != self.fingerprint:
            raise ReplayError(
                f"replay {self.plan.replay_id!r} was started with other settings, source or lineage; "
                "resume it with the same ones, or start a new replay id"
            )
        restored = self.session.restore(snapshot=snapshot)
        if self.variants is not None:
            self.variants.restored(restored)
        self.ranges = Ranges.from_json(meta["ranges"])
        self.steps_done = int(meta["steps_done"])
        counts = meta["counts"]
        self.examples = int(counts["examples"])
        self.event_dead_letters = int(counts["dead_letters"]) if self.plan.source == "events" else 0
        self.sinks.dead_letters = 0 if self.plan.source == "events" else int(counts["dead_letters"])
        self.sinks.rejected, self.sinks.drifts = int(counts["rejected"]), int(counts["drifts"])
        self.published = list(meta["published"])
        self.done = bool(meta["done"])
        self.seconds = float(meta["seconds"])
        self.started_at = float(meta["started_at"])
        log.info(
            "replay_resumed",
            replay_id=self.plan.replay_id,
            version=self.version,
            records=self._read_so_far(),
            of=self.ranges.total(),
        )
        return True

    def summary(self) -> dict[str, Any]:
        """What the replay did: range, counts, versions and digests (JSON-able)."""
        last = self.published[-1] if self.published else None
        return {
            "replay_id": self.plan.replay_id,
            "source": self.plan.source,
            "lineage": self.lineage,
            "live_model": self.settings.trainer_model,
            "done": self.done,
            "output": self.plan.output_dir or f"topic {self.settings.topic_models}",
            "ranges": self.ranges.to_json(),
            "records_in_ranges": self.ranges.total(),
            "records_read": self._read_so_far(),
            "counts": self.counts,
            "learner_counts": dict(self.learner.counts),
            "metrics": self.learner.summary(),
            "version": self.version,
            "published": self.published,
            "final_sha256": last["sha256"] if last else None,
            "final_sha256_as_live": last["sha256_as_live"] if last else None,
            "seconds": round(self.seconds, 3),
            "close_windows": self.plan.close_windows,
            "join_step_events": self.settings.replay_join_step_events,
        }
