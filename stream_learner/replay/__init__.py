"""Replay: re-run the join and the training over a closed range of the topics, deterministically.

``stream-learner replay`` reads a closed range (per partition ``[start,
end)``, by offsets or by record timestamp, :mod:`.ranges`) of either

* the prediction and label topics (``--source events``): the events go
  through the live join script (``join.lua``, under a private Redis key
  prefix ``sl:{replay-<id>}:``, so the live join state is never touched) and
  its examples straight to the learner; or
* the examples topic (``--source examples``): training alone,

and learns with the live trainer's code (:class:`~stream_learner.learn.learner.OnlineLearner`,
the same chunking, drift policy and manifests), publishing a **new lineage**
(``<trainer_model>@replay-<id>`` by default) to the model topic or to a
directory. The live lineage is written only with ``overwrite_live``.

**Merge order** (:mod:`.merge`): each partition in offset order; across
partitions, the record with the smallest ``(time, topic, partition,
offset)`` next, where time is the event's ``event_time`` for predictions and
labels and the record timestamp for examples. A record is taken only when
every unfinished partition has one waiting, so the order depends on the
records alone, never on fetch sizes or poll boundaries.

**Determinism.** The join runs in steps of ``replay_join_step_events``
merged events (the live joiner's step is one poll, whose size depends on the
fetch); the learner takes chunks of exactly ``trainer_batch_size`` examples
and, at the range's end, one last partial chunk; checkpoints are taken
after a chunk when ``trainer_checkpoint_every_examples`` examples were
applied since the last one or a drift policy asks (never by wall clock).
Two replays of the same range with the same settings publish the same
versions with the same weights digests, whatever the fetch sizes.

**Differences from live, by design.** The replayed watermark advances per
join step instead of per poll: examples whose kind depends on when the
watermark passed (a prediction that arrives after its window closed, or
state collected before a duplicate) can differ from what the live joiner
happened to do. A partition with no record in the range takes no part in the
watermark (live, it would be idle); the others hold it until the range
ends. Windows
still open at the end stay open (nothing emitted for them) unless
``close_windows``. Dead letters are counted, not written to the dead-letter
topic; drift events are counted in the manifests, not written to the drift
topic.

**Resumable.** The replay's state (learner, positions, examples not yet
learned, versions, the resolved ranges) is saved under
``<replay_state_dir>/<id>`` before every checkpoint and when interrupted;
the same command continues where it stopped. The Redis join state is
rebuilt from the range's start on resume (fast: the join without training).
"""

from __future__ import annotations

from .plan import ReplayPlan, result_fingerprint
from .runner import Replay

__all__ = ["Replay", "ReplayPlan", "result_fingerprint"]
