"""The trainer's state store: one atomic snapshot, on disk or in Redis.

A :class:`Snapshot` is everything the trainer needs to resume exactly where
it was: named tensors (weights, optimizer moments, ...) and JSON-able
``meta`` (the examples offsets applied, the dedup window, detector state,
the last version, ...). A store keeps the latest one; :meth:`StateStore.save`
is atomic (a reader sees the old snapshot or the new one, never a mix) and
durable when it returns.

**The order the learning session follows** (docs/architecture.md, "Delivery"):

1. apply a batch of examples to the model;
2. ``store.save(snapshot)``, the snapshot including the offsets just applied
   and the version about to be published; wait for it to return;
3. only then :func:`~stream_learner.checkpoint.publish.publish_checkpoint`
   the checkpoint that snapshot describes.

So a published version is never lost: a serving node never runs a model the
trainer could forget. On restart the trainer calls ``store.load()``,
restores the model, seeks its input to ``meta``'s offsets (offsets committed
to Kafka are for monitoring only), and, if it may have crashed between 2 and
3, publishes the snapshot's checkpoint again; readers take the newest
manifest, so a version published twice is harmless.

Snapshots are encoded with safetensors (``meta`` as a JSON string in the
safetensors metadata under ``"meta"``). Pickle is never used, for writing or
reading.

>>> import tempfile, torch
>>> with tempfile.TemporaryDirectory() as tmp:
...     store = DirectoryStateStore(tmp)
...     print(store.load())
...     store.save(Snapshot({"w": torch.ones(2)}, {"offsets": {"0": 41}, "version": 3}))
...     restored = store.load()
None
>>> restored.tensors["w"], restored.meta
(tensor([1., 1.]), {'offsets': {'0': 41}, 'version': 3})
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import redis
import structlog
import torch

from ..redis_conn import check_waitaof, waitaof
from ..util.files import atomic_write, remove_leftovers
from .codec import decode_tensors, encode_tensors
from .errors import CheckpointError

if TYPE_CHECKING:
    from ..util.retry import Retry

log = structlog.get_logger(__name__)

#: Written into every snapshot, checked on load.
FORMAT = "stream-learner-state/1"
STATE_FILE = "state.safetensors"


@dataclass(frozen=True, eq=False)  # tensors have no truth value: no ==
class Snapshot:
    """The trainer's full state: named tensors and JSON-able metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


@runtime_checkable
class StateStore(Protocol):
    """Where the trainer keeps its latest snapshot."""

    def save(self, snapshot: Snapshot) -> None:
        """Replace the stored snapshot, atomically and durably."""
        ...

    def load(self) -> Snapshot | None:
        """The stored snapshot, or ``None`` if none was ever saved."""
        ...


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """A snapshot as safetensors bytes.

    Raises ``ValueError`` if ``meta`` would not come back equal from JSON
    (a tuple, a non-string key, NaN, an object): the trainer would resume
    from something other than what it saved.
    """
    try:
        text = json.dumps(snapshot.meta, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"snapshot meta is not JSON: {exc}") from None
    if json.loads(text) != snapshot.meta:
        raise ValueError("snapshot meta does not survive JSON unchanged (tuples or non-string keys?)")
    return encode_tensors(snapshot.tensors, {"format": FORMAT, "meta": text})


def decode_snapshot(data: bytes) -> Snapshot:
    """The snapshot :func:`encode_snapshot` wrote; :class:`CheckpointError` for anything else."""
    tensors, metadata = decode_tensors(data)
    if metadata.get("format") != FORMAT or "meta" not in metadata:
        raise CheckpointError(f"not a stream-learner state snapshot (format {metadata.get('format')!r})")
    try:
        meta = json.loads(metadata["meta"])
    except ValueError as exc:
        raise CheckpointError(f"state snapshot meta is not JSON: {exc}") from None
    return Snapshot(tensors, meta)


class DirectoryStateStore:
    """Snapshots in ``<path>/state.safetensors``, replaced atomically.

    ``save`` writes a temporary file in the same directory, fsyncs it,
    renames it over the state file (``os.replace``, atomic on POSIX) and
    fsyncs the directory, so after a crash or power loss the file holds the
    old snapshot or the new one. One writer per directory.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = self.path / STATE_FILE
        remove_leftovers(self.path)  # a writer killed mid-save leaves its temporary file

    def save(self, snapshot: Snapshot) -> None:
        """Replace the snapshot atomically; durable when this returns."""
        atomic_write(self.file, encode_snapshot(snapshot))

    def load(self) -> Snapshot | None:
        """The last saved snapshot, or ``None`` if there is none."""
        try:
            data = self.file.read_bytes()
        except FileNotFoundError:
            return None
        return decode_snapshot(data)


class RedisStateStore:
    """Snapshots in one Redis string (``SET``, which is atomic).

    With ``wait_aof`` (the default), ``save`` returns only after Redis has
    fsynced the write to its append-only file (``WAITAOF``); on a server
    without AOF the wait is turned off with a warning, and a Redis crash may
    then lose the last snapshot. ``client`` must return bytes (no
    ``decode_responses``). A Redis string holds at most 512 MB.
    """

    def __init__(self, client: redis.Redis, key: str, *, wait_aof: bool = True, replicas: int = 0) -> None:
        self.client = client
        self.key = key
        self.wait_aof = wait_aof
        self.replicas = replicas  # redis_wait_replicas

    def save(self, snapshot: Snapshot) -> None:
        """Replace the snapshot atomically; durable (AOF) when this returns."""
        self.client.set(self.key, encode_snapshot(snapshot))
        if self.wait_aof:
            try:
                reply = self.client.execute_command(*waitaof(self.replicas))  # type: ignore[no-untyped-call]
                check_waitaof(reply, self.replicas)
            except redis.ResponseError as exc:
                log.warning("state_store_not_durable", key=self.key, reason=str(exc))
                self.wait_aof = False

    def load(self) -> Snapshot | None:
        """The last saved snapshot, or ``None`` if there is none."""
        data = self.client.get(self.key)
        if data is None:
            return None
        if not isinstance(data, bytes):
            raise CheckpointError("the Redis client decodes responses; the state store needs bytes")
        return decode_snapshot(data)


class RetryingStateStore:
    """Another store whose ``save`` and ``load`` are retried while their errors are transient.

    ``retry`` (:class:`~stream_learner.util.retry.Retry`) decides what is
    transient (a Redis down, restarting or loading its AOF; not wrong
    credentials) and paces the tries; when its stop event is set it raises
    :class:`~stream_learner.util.retry.Stopped` instead of waiting on. A save
    retried after a failure writes the whole snapshot again, so it is as
    atomic and durable as the first try would have been; the caller (the
    learning session) waits meanwhile, learning nothing, so no example is
    applied twice across it.
    """

    def __init__(self, inner: StateStore, retry: Retry) -> None:
        self.inner = inner
        self.retry = retry

    def save(self, snapshot: Snapshot) -> None:
        """The inner store's ``save``, until it succeeds."""
        self.retry.call(lambda: self.inner.save(snapshot))

    def load(self) -> Snapshot | None:
        """The inner store's ``load``, until it succeeds."""
        return self.retry.call(self.inner.load)
