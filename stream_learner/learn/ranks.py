"""The data-parallel trainer's group: N rank processes learning one model with torch.distributed.

Every rank reads its own partitions of the examples topic (partition ``p``
belongs to rank ``p % N``: assigned, not a consumer group, so the split
depends on the topic alone). The ranks move in lockstep, one round per
poll:

1. each rank polls its partitions and says, in one all-gather, how many
   records it holds unlearned, whether it is *dry* (caught up with its
   partitions and, if it holds any record, ``trainer_max_wait_ms`` after the
   oldest arrived), whether it was asked to stop, and (rank 0 only) whether
   a clock checkpoint is due;
2. from those numbers alone every rank plans the same steps
   (:func:`plan_steps`): a global chunk is one share of
   ``trainer_batch_size`` from every rank (:func:`shares`); a rank short of
   its share holds the others back unless it is dry, in which case it gives
   what it has. So a partition that runs dry never stalls the others, and
   on a backlog (no rank dry before the end) the chunks depend on the topic
   alone;
3. the records of the planned steps are all-gathered, so every rank holds
   the same global chunks and runs the same learner on them: featurizer
   statistics, prequential scores, drift detectors, the dedup window and the
   pseudo-label memory are equal on every rank by construction, with no
   merge rule of their own;
4. the optimizer step is what is shared: each rank computes the loss
   gradient of its slice of the training batch (:meth:`RankGroup.rows`), and
   one all-reduce sums the gradients and gathers the per-example losses
   (:meth:`RankGroup.all_reduce`), so every rank applies the same clipped update
   and the spike guard judges the whole batch.

Only rank 0 writes: it saves the one snapshot (every partition's position:
the ranks' states are equal), publishes checkpoints, sends dead letters and
drift events. On start rank 0 loads the snapshot and broadcasts it; every
rank restores it and seeks its partitions. A rank that dies fails the
group's next collective; torch's elastic agent restarts the whole group,
which resumes from the last snapshot. docs/architecture.md, "Scale-out".
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from ..errors import ConfigError, EventError
from .items import BatchedExample, CorruptBatch, Record, StoredRecord

__all__ = ["RankGroup", "assigned", "pack_records", "plan_steps", "shares", "unpack_records"]


def shares(batch: int, world: int) -> list[int]:
    """Each rank's share of a global chunk of ``batch`` examples (the first ranks take the remainder).

    >>> shares(32, 2), shares(10, 4)
    ([16, 16], [3, 3, 2, 2])
    """
    return [batch // world + (1 if r < batch % world else 0) for r in range(world)]


def assigned(partitions: Sequence[int], rank: int, world: int) -> list[int]:
    """The partitions rank ``rank`` of ``world`` reads: ``p % world == rank``.

    >>> assigned(range(6), 1, 4)
    [1, 5]
    """
    return [p for p in partitions if p % world == rank]


def check_world(world: int, partitions: int, topic: str) -> None:
    """Refuse more ranks than ``topic`` has partitions (a rank would read nothing, forever).

    >>> check_world(3, 2, "sl.examples")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stream_learner.errors.ConfigError: 3 trainer ranks for 2 partitions of sl.examples: a rank would read nothing; ...
    """
    if world > partitions:
        raise ConfigError(
            f"{world} trainer ranks for {partitions} partitions of {topic}: a rank would read nothing; "
            "give the topic at least as many partitions as ranks"
        )


def plan_steps(held: Sequence[int], share: Sequence[int], dry: Sequence[bool]) -> list[list[int]]:
    """Per step, what each rank contributes: its share while every rank has one; when the ranks short
    of their share are all dry, what each has up to its share (step by step until nothing is left).

    >>> plan_steps([5, 4], [2, 2], [False, False])  # a backlog: full shares only
    [[2, 2], [2, 2]]
    >>> plan_steps([5, 0], [2, 2], [False, True])  # rank 1 ran dry: rank 0 goes on alone
    [[2, 0], [2, 0]]
    >>> plan_steps([3, 1], [2, 2], [True, True])  # everything caught up: the rest, in partial chunks
    [[2, 1], [1, 0]]
    """
    left, steps = list(held), list[list[int]]()
    while True:
        short = [r for r, (h, s) in enumerate(zip(left, share, strict=True)) if h < s]
        if any(not dry[r] for r in short):
            return steps
        take = [min(h, s) for h, s in zip(left, share, strict=True)]
        if not any(take):
            return steps
        steps.append(take)
        left = [h - t for h, t in zip(left, take, strict=True)]


_RECORDS = msgspec.msgpack.Encoder()
#: (topic, partition, offset, key, value, headers, batch index, batch size, error): the index is -1 but for
#: one example of a batch record; the error (kind, field, reason) is that of a batch that does not parse.
_Packed = tuple[
    str, int, int, bytes | None, bytes | None, list[tuple[str, bytes]], int, int, tuple[str, str, str] | None
]
_RECORDS_OF = msgspec.msgpack.Decoder(list[_Packed])


def _pack(r: Any) -> tuple[Any, ...]:
    if isinstance(r, BatchedExample):
        return (r.topic, r.partition, r.offset, r.key, r.value, [], r.batch_index, r.batch_size, None)
    if isinstance(r, CorruptBatch):
        e = (r.error.kind, r.error.field, r.error.reason)
        return (r.topic, r.partition, r.offset, r.key, r.value, [], -1, 0, e)
    headers = [tuple(h) for h in getattr(r, "headers", None) or ()]
    return (r.topic, r.partition, r.offset, r.key, r.value, headers, -1, 0, None)


def pack_records(records: Sequence[Record]) -> bytes:
    """Items (records, examples of batch records, batches that do not parse) as bytes, for the all-gather
    (what a dead letter needs of each, headers too).

    >>> r = StoredRecord("t", 1, 7, b"k", b"v", (("h", b"x"),))
    >>> b = BatchedExample("t", 1, 8, 0, 2, b"{}")
    >>> unpack_records(pack_records([r, b])) == [r, b]
    True
    """
    return _RECORDS.encode([_pack(r) for r in records])


def unpack_records(data: bytes) -> list[Record]:
    """The items of :func:`pack_records`."""
    out: list[Record] = []
    for t, p, o, k, v, h, index, size, error in _RECORDS_OF.decode(data):
        if index >= 0:
            out.append(BatchedExample(t, p, o, index, size, v or b"", k))
        elif error is not None:
            out.append(CorruptBatch(t, p, o, k, v, EventError(*error)))
        else:
            out.append(StoredRecord(t, p, o, k, v, tuple(h)))
    return out


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> Any:
    """The group's key-value store (``MASTER_ADDR:MASTER_PORT``), its keys under this attempt's prefix.

    torch's elastic agent keeps one store for every restart of the group (``TORCHELASTIC_USE_AGENT_STORE``),
    so without a prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) a restarted rank finds the dead
    ranks' addresses there and fails to connect (seen here: every restart refused).
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]

    store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=rank == 0 and not agent,
        timeout=timeout,
        multi_tenant=True,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return PrefixStore(f"stream-learner/attempt-{attempt}", store)


class RankGroup:
    """This process's place in the group and the collectives the trainer uses (module docstring).

    The control collectives (numbers, records, the snapshot) run on gloo;
    the gradient all-reduce on ``backend`` (nccl for CUDA models, gloo on CPU).
    """

    def __init__(self, rank: int, world: int, *, backend: str = "gloo", timeout_s: float = 1800.0) -> None:
        self.rank = rank
        self.world = world
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group(
                backend, store=_attempt_store(rank, world, timeout), rank=rank, world_size=world, timeout=timeout
            )
        self.control: Any = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        #: Seconds in the gradient all-reduces and all-reduces counted (bench/bench_scale.py).
        self.reduce_s = 0.0
        self.reduces = 0

    @classmethod
    def from_env(cls, *, device: str = "cpu", timeout_s: float = 1800.0) -> RankGroup | None:
        """The group torchrun (or ``trainer_dist_world_size``'s launcher) started this process in; ``None``
        outside one (``WORLD_SIZE`` unset or 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
            raise ConfigError("WORLD_SIZE is set without RANK and MASTER_ADDR: start the ranks with torchrun")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        return cls(int(os.environ["RANK"]), world, backend=backend, timeout_s=timeout_s)

    @property
    def lead(self) -> bool:
        """True on rank 0, the one that writes."""
        return self.rank == 0

    def rows(self, n: int) -> tuple[int, int]:
        """This rank's slice ``[lo, hi)`` of a batch of ``n`` rows (contiguous, sizes differing by at most one).

        >>> g = RankGroup.__new__(RankGroup); g.rank, g.world = 1, 3
        >>> g.rows(10)
        (3, 6)
        """
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place (the gradient all-reduce, timed)."""
        began = time.perf_counter()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        self.reduce_s += time.perf_counter() - began
        self.reduces += 1

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (the same length on every rank), by rank."""
        mine = torch.tensor(list(values), dtype=torch.int64)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.control)
        return [t.tolist() for t in out]

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, by rank (sizes first, then the bytes padded to the largest)."""
        sizes = [s[0] for s in self.gather_ints([len(data)])]
        largest = max(sizes)
        mine = torch.zeros(largest, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty(largest, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.control)
        return [t[:size].numpy().tobytes() for t, size in zip(out, sizes, strict=True)]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: the group's ranks trust each other)."""
        box = [obj if self.lead else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        """Leave the group (a peer still in a collective then fails at once instead of timing out)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def launches_ranks(world_size: int) -> bool:
    """True when this ``trainer`` process is to launch ``world_size`` ranks rather than be one
    (``WORLD_SIZE`` in the environment: it is a rank already, started by torchrun or a launcher)."""
    return world_size > 1 and "WORLD_SIZE" not in os.environ


def rank_metrics_port(port: int | None, world_size: int) -> int | None:
    """Where a trainer process serves /metrics and /health: rank ``r`` on ``port + r``, a launcher nowhere."""
    if port is None or launches_ranks(world_size):
        return None
    return port + int(os.environ.get("RANK", "0"))


def launch(world: int, max_restarts: int, argv: Sequence[str]) -> int:
    """Run ``python -m stream_learner <argv>`` as ``world`` ranks under torch's elastic agent (what
    ``torchrun --standalone`` does): a rank that fails restarts the whole group, up to ``max_restarts``
    times. Returns the exit status for the command line."""
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a store on a free port, this process its host
        max_restarts=max_restarts,
        monitor_interval=0.5,
        # A rank blocked in a collective cannot take SIGTERM; killing it is safe (the group restarts
        # from its last snapshot), waiting the default 30 s is not worth it.
        shutdown_timeout=10,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "stream_learner", *argv)
    except ChildFailedError as exc:
        print(f"stream-learner trainer: the rank group failed {max_restarts + 1} times: {exc}", file=sys.stderr)
        return 1
    except (SignalException, KeyboardInterrupt):
        return 0  # the agent stopped the ranks (SIGTERM or Ctrl-C)
    return 0
