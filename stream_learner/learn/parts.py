"""The learner's parts that hold running state, each saving and restoring its own.

Every part writes its tensors into the state's tensor dict under its own
names and returns its JSON-able meta from ``save``; ``load`` takes both
back. The learner's stages hold them (:mod:`.intake` the dedup window,
:mod:`.prequential` the pseudo-labels, :mod:`.stepper` the spike guard and
the learning-rate schedule), and
:class:`~stream_learner.learn.learner.OnlineLearner` is the stages plus the
chunk loop that drives them; its ``state_dict`` is the union.

>>> w = DedupWindow(2)
>>> [w.add(d) for d in (b"a" * 16, b"b" * 16, b"a" * 16, b"c" * 16)]
[True, True, False, True]
>>> w.add(b"a" * 16)                    # evicted by c: remembered again
True
>>> w.add_many([b"d" * 16, b"d" * 16, b"c" * 16])   # add of each in turn: d evicts c
[True, False, True]
>>> g = SpikeGuard(factor=5.0, warmup=2, patience=1)
>>> for losses in ([1.0, 0.5, 0.5], [0.5, 1.0, 0.5]):
...     g.check(losses); g.learned(losses)
'learn'
'learn'
>>> g.check([10.0, 0.0, 0.0])           # one bad example in three: bad luck, not bad weights
'learn'
>>> g.check([10.0, 10.0, 0.0]), g.check([10.0, 10.0, 0.0])   # a spike; the second in a row is a new level
('rollback', 'learn')
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]
Verdict = Literal["learn", "rollback"]


class DedupWindow:
    """The digests (16 bytes) of the last ``size`` distinct examples, oldest evicted first.

    Membership is a set; insertion order is a ring of ``size`` slots in one bytearray, so a
    snapshot is one copy of that buffer (an OrderedDict's was a list of 100 000 objects,
    joined: most of the checkpoint's own time).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.members: set[bytes] = set()
        self.ring = bytearray(16 * size)
        self.next = 0  # the slot the next digest goes to; once full, the oldest one
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, digest: bytes) -> bool:
        """Remember ``digest``; False if it is already in the window (a duplicate)."""
        if digest in self.members:
            return False
        at = 16 * self.next
        if self.count == self.size:
            self.members.discard(bytes(self.ring[at : at + 16]))
        else:
            self.count += 1
        self.ring[at : at + 16] = digest
        self.members.add(digest)
        self.next = self.next + 1 if self.next + 1 < self.size else 0
        return True

    def add_many(self, digests: Sequence[bytes]) -> list[bool]:
        """:meth:`add` of each digest in turn (a duplicate within ``digests`` too), on local variables."""
        members, ring, size = self.members, self.ring, self.size
        at, count = self.next, self.count
        fresh: list[bool] = []
        record = fresh.append
        for digest in digests:
            if digest in members:
                record(False)
                continue
            start = 16 * at
            if count == size:
                members.discard(bytes(ring[start : start + 16]))
            else:
                count += 1
            ring[start : start + 16] = digest
            members.add(digest)
            at = at + 1 if at + 1 < size else 0
            record(True)
        self.next, self.count = at, count
        return fresh

    def snapshot(self) -> bytes:
        """The digests, oldest first, concatenated."""
        if self.count < self.size:
            return bytes(self.ring[: 16 * self.count])
        at = 16 * self.next
        return bytes(self.ring[at:]) + bytes(self.ring[:at])

    def restore(self, data: bytes) -> None:
        """Restore from :meth:`snapshot` (the oldest beyond ``size`` are dropped)."""
        n = len(data) // 16
        self.members, self.ring, self.next, self.count = set(), bytearray(16 * self.size), 0, 0
        for i in range(max(0, n - self.size), n):
            self.add(data[16 * i : 16 * i + 16])

    def save(self, tensors: Tensors) -> None:
        """Into ``tensors["dedup"]``: a ``[n, 16]`` uint8 matrix, oldest first."""
        seen = self.snapshot()
        tensors["dedup"] = (
            torch.frombuffer(bytearray(seen), dtype=torch.uint8).reshape(len(seen) // 16, 16)
            if seen
            else torch.zeros((0, 16), dtype=torch.uint8)
        )

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`save` wrote."""
        self.restore(tensors["dedup"].contiguous().numpy().tobytes())


class PseudoLabels:
    """The class each recent pseudo-labeled prediction was given, by prediction event id.

    A late label looks its prediction up to score the pseudo-label's
    precision; the oldest of more than ``capacity`` entries are forgotten.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.labels: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self.labels)

    def remember(self, prediction_event_id: str, label: int) -> None:
        """Record the pseudo-label of a prediction."""
        labels = self.labels
        labels[prediction_event_id] = label
        if len(labels) > self.capacity:
            labels.popitem(last=False)

    def take(self, prediction_event_id: str) -> int | None:
        """The pseudo-label given to a prediction (forgotten now), or ``None``."""
        return self.labels.pop(prediction_event_id, None)

    def save(self, tensors: Tensors) -> list[list[Any]] | None:
        """Into ``tensors`` (ids joined by NUL, classes), in order; returns the meta: ``None``, or
        ``[id, class]`` pairs only if an id contains a NUL. Up to 100 000 pairs as JSON were 90 %
        of the meta and half of a checkpoint's state_dict time."""
        if any("\0" in k for k in self.labels):
            return [[k, v] for k, v in self.labels.items()]
        ids = "\0".join(self.labels)
        tensors["pseudo.ids"] = (
            torch.frombuffer(bytearray(ids.encode()), dtype=torch.uint8) if ids else torch.zeros(0, dtype=torch.uint8)
        )
        tensors["pseudo.classes"] = torch.from_numpy(
            np.fromiter(self.labels.values(), dtype=np.int64, count=len(self.labels))
        )
        return None

    def load(self, tensors: Mapping[str, torch.Tensor], meta: list[list[Any]] | None) -> None:
        """Restore what :meth:`save` wrote."""
        if meta is not None:
            self.labels = OrderedDict((str(k), int(v)) for k, v in meta)
            return
        classes = tensors["pseudo.classes"].tolist()
        ids = tensors["pseudo.ids"].numpy().tobytes().decode().split("\0") if classes else []
        if len(ids) != len(classes):
            raise ValueError(f"state has {len(ids)} pseudo-label ids for {len(classes)} classes")
        self.labels = OrderedDict(zip(ids, classes))


class SpikeGuard:
    """Refuses a batch whose loss on its labeled examples is implausibly high, unless the level persists.

    Like is compared with like. Only the examples that carry a true label
    are judged: a pseudo-label's loss is bounded by its own confidence and
    would drag the running level down. And a batch of ``n`` labels is judged
    as ``n`` examples: per-example losses are heavy-tailed (mostly near 0, a
    confident mistake costs 2-30), so the mean of three labels that hold one
    mistake is many times the running mean without anything being wrong.
    Damaged weights raise the loss of most examples, a healthy model's bad
    luck that of a few. So a batch is a spike only if it has at least
    :attr:`MIN_LABELS` labels, at least half of them are each above
    ``factor`` × the running mean (exponentially weighted per labeled
    example, ``memory`` of them: a batch of 32 decays the past by about
    0.9, as the per-batch average did), and their mean is above the mean of
    the ``n`` worst of the last ``window`` labeled losses (worse than the
    worst ``n`` examples of the recent past put together).

    :meth:`check` a counted batch's labeled losses before its step: after
    ``warmup`` good batches, ``"rollback"`` for a spike fewer than
    ``patience`` times in a row, else ``"learn"``; after ``patience`` spikes
    in a row the new level is accepted as a concept change. A batch with too
    few labels is not judged. :meth:`learned` records a batch that was stepped.
    """

    #: Fewer labels than this in a batch are no evidence against the weights: it is not judged.
    MIN_LABELS = 3

    def __init__(self, factor: float, warmup: int, patience: int, memory: float = 320.0, window: int = 512) -> None:
        self.factor = factor
        self.warmup = warmup
        self.patience = patience
        self.decay = 1.0 - 1.0 / memory
        self.loss_ema = math.nan  # per labeled example
        self.weight = 0.0  # the decayed number of labeled examples behind it
        self.recent: deque[float] = deque(maxlen=window)  # the last labeled losses, oldest first
        self.good_batches = 0
        self.spikes_in_a_row = 0

    def check(self, losses: Sequence[float]) -> Verdict:
        """Whether a batch whose labeled examples have these (finite) losses may be learned."""
        n = len(losses)
        if n == 0:
            return "learn"
        mean = math.fsum(losses) / n
        # Cheap tests first: the worst-n bar is only needed (and only computed) past them.
        spike = n >= self.MIN_LABELS and self.good_batches >= self.warmup
        if spike:
            level = self.factor * self.loss_ema
            spike = 2 * sum(1 for x in losses if x > level) >= n
        if spike and self.recent:
            worst = heapq.nlargest(n, self.recent)
            spike = mean > math.fsum(worst) / len(worst)
        if spike and self.spikes_in_a_row < self.patience:
            self.spikes_in_a_row += 1
            return "rollback"
        if spike:
            # The loss stayed high for `patience` batches in a row: not a bad
            # update but a new level (a concept drift). Accept it and learn.
            self.loss_ema, self.weight = mean, 0.0
        self.spikes_in_a_row = 0
        return "learn"

    def learned(self, losses: Sequence[float]) -> None:
        """A batch whose labeled examples have these losses was stepped."""
        n = len(losses)
        if n == 0:
            return
        total = math.fsum(losses)
        kept = self.weight * self.decay**n
        self.loss_ema = total / n if kept == 0.0 else (kept * self.loss_ema + total) / (kept + n)
        self.weight = kept + n
        self.recent.extend(losses)
        self.good_batches += 1

    def save(self, tensors: Tensors) -> dict[str, Any]:
        """Into ``tensors["guard.recent"]`` (float64, oldest first); returns the JSON-able rest."""
        tensors["guard.recent"] = torch.tensor(list(self.recent), dtype=torch.float64)
        return {
            "loss_ema": None if math.isnan(self.loss_ema) else self.loss_ema,
            "loss_weight": self.weight,
            "good_batches": self.good_batches,
            "spikes_in_a_row": self.spikes_in_a_row,
        }

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`save` wrote (a state from before the per-example statistics keeps
        its level and starts its recent losses empty)."""
        self.loss_ema = math.nan if meta["loss_ema"] is None else float(meta["loss_ema"])
        self.weight = float(meta.get("loss_weight", 0.0 if math.isnan(self.loss_ema) else 1.0))
        self.recent.clear()
        if "guard.recent" in tensors:
            self.recent.extend(tensors["guard.recent"].tolist())
        self.good_batches = int(meta["good_batches"])
        self.spikes_in_a_row = int(meta["spikes_in_a_row"])


class LrSchedule:
    """The base learning rate, and a temporary boost (a drift policy's action) counted in batches."""

    def __init__(self, base_lr: float) -> None:
        self.base_lr = base_lr
        self.boost_left = 0

    def boost(self, optimizer: torch.optim.Optimizer, factor: float, steps: int) -> None:
        """``factor`` × the base rate for the next ``steps`` batches."""
        set_lr(optimizer, self.base_lr * factor)
        self.boost_left = steps

    def stepped(self, optimizer: torch.optim.Optimizer) -> None:
        """One batch was learned: the boost, if any, runs down."""
        if self.boost_left > 0:
            self.boost_left -= 1
            if self.boost_left == 0:
                set_lr(optimizer, self.base_lr)

    def save(self) -> dict[str, Any]:
        """JSON-able state (the current rate itself is in the optimizer's state)."""
        return {"lr_boost_left": self.boost_left}

    def load(self, meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`save` returned."""
        self.boost_left = int(meta["lr_boost_left"])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
