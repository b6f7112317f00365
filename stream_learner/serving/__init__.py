"""The serving side: follow the model topic, verify, load and atomically swap the model.

A serving node embeds one :class:`CheckpointSubscriber` per model it serves
and answers every request with ``subscriber.current.predict_one(features)``.

**What the subscriber does, in order**

1. *Catch up.* It reads the end offset of every partition of the model
   topic, then loads the newest checkpoint with
   :func:`~stream_learner.checkpoint.reader.read_latest` (a handful of
   records read from the end, never the history), builds and smoke-tests
   its model (:func:`load_served_model`) and makes it current.
2. *Follow.* One consumer without a group (manual assignment, as the reader
   uses) reads every partition of the topic forward: from just after the
   newest manifest in its partition, from the end offsets of step 1 in the
   others (so nothing appended during the catch-up is missed). Records are
   sorted by their headers first, which is cheap: another model's records
   are skipped; this model's chunks are kept in a bounded
   :class:`~stream_learner.serving.window.ChunkWindow` (so a manifest's
   chunks, read just before it, are not fetched twice); a manifest of a
   version not above the newest one followed is ignored.
3. *Load.* A newer manifest record is verified and its weights loaded by
   :func:`~stream_learner.checkpoint.reader.load_manifest_record`
   (signature, chunks, digest, safetensors), then built into a
   :class:`ServedModel`: a fresh ``nn.Module`` from the signed
   architecture, weights loaded strictly, eval mode, a smoke prediction
   that must be finite.
4. *Swap.* Only then does ``current`` change, by one reference assignment:
   a request sees the old model or the new one, never a half-loaded one.
   ``on_swap(new, old)`` runs after the swap, outside the lock.

**Never backwards.** While following, only a version strictly greater than
the newest one followed is loaded: an older manifest replayed onto the
topic (a downgrade attack, or an honest duplicate) is counted and ignored.
The limit: a subscriber that *starts* after an old manifest was replayed
onto the end of the topic serves that version until a newer one arrives
(the catch-up reads the newest manifest record, not the whole history).
Only the trainer should be allowed to write the model topic (Kafka ACLs).
:meth:`CheckpointSubscriber.pin` (alias ``rollback``) is the only way back
to an older version; :meth:`~CheckpointSubscriber.unpin` returns to the
newest. While pinned, newer versions are still verified and loaded in the
background (so that unpinning is immediate), but not served.

**Failures** (a refused signature or key, a missing or foreign chunk, a
digest mismatch, weights that are not safetensors, an architecture that
does not match its weights, a non-finite smoke prediction, a broker error)
keep the last good model current. Each is logged, counted by reason in
``stream_learner_serving_swap_failures_total{reason}`` and kept as
``status()["last_error"]``; the subscriber goes on following. A broker error
while loading re-reads the same manifest after a back-off, so a version is
not skipped because the broker was briefly away. If the newest checkpoint
is refused at catch-up, nothing older is served instead (as the reader
never falls back): the subscriber follows from there and serves the next
good version.

**Threads.** :meth:`~CheckpointSubscriber.start` runs the loop on a daemon
thread that never dies of an exception; :meth:`~CheckpointSubscriber.poll_once`
runs one step on the caller's thread instead. ``current`` is safe to read
from any number of threads; a :class:`ServedModel`'s network and statistics
are never mutated, so concurrent ``predict`` calls share it freely (only its
featurizer's missing-value counters are bumped, without a lock).

**Trust.** Only manifests signed by a key in ``public_keys`` are loaded.
The signed architecture may name a model factory
(``package.module:function``), which is imported: trusting a signing key
means trusting the code its manifests name, as the trainer runs it too.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from kafka import TopicPartition

from ..checkpoint.errors import CheckpointError, CheckpointNotFoundError
from ..checkpoint.publish import H_MODEL, H_TYPE, TYPE_CHUNK, TYPE_MANIFEST
from ..checkpoint.reader import (
    PublicKeys,
    key_list,
    load_manifest_record,
    make_reader_consumer,
    read_latest,
    read_version,
    record_header,
)
from ..checkpoint.signing import load_public_key
from ..config import Settings
from ..errors import ConfigError
from ..metrics import Metrics
from .failures import ModelLoadError, failure_reason, is_transient
from .model import ServedModel, load_served_model
from .window import ChunkWindow, header_version

log = structlog.get_logger(__name__)

__all__ = [
    "CheckpointSubscriber",
    "ModelLoadError",
    "ServedModel",
    "failure_reason",
    "load_served_model",
    "public_keys_from_settings",
]

#: Chunks of versions not yet loaded that the follower keeps in memory, at
#: most (bytes). A manifest's chunks that fell out are fetched by offset.
DEFAULT_WINDOW_BYTES = 64 * 1024 * 1024

#: How often the follower looks for partitions added to the model topic (seconds).
PARTITION_REFRESH_S = 30.0

#: Back-off after a broker error: doubles from the first value up to the second (seconds).
BACKOFF_S = (0.2, 5.0)


def public_keys_from_settings(settings: Settings) -> list[Ed25519PublicKey]:
    """The trusted checkpoint keys named by ``serving_public_keys`` (PEM files).

    Raises :class:`~stream_learner.errors.ConfigError` if none is set, and
    :class:`~stream_learner.checkpoint.errors.SignatureError` for a file
    that is unreadable or not an Ed25519 public key.
    """
    if not settings.serving_public_keys:
        raise ConfigError("serving_public_keys is empty: give the PEM file of the trainer's public key")
    return [load_public_key(path) for path in settings.serving_public_keys]


# -- following the model topic -----------------------------------------------------


class _Counting:
    """A consumer proxy that counts the records its polls return (the work a read did)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.records = 0

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        batch = self.inner.poll(*args, **kwargs)
        self.records += sum(len(records) for records in batch.values())
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CheckpointSubscriber:
    """Follows one model on the model topic and keeps its newest good version current.

    See the module docstring for what it does and guarantees. ``model``
    defaults to ``settings.serving_model``, then ``settings.trainer_model``;
    ``settings.serving_pin_version``, if set, pins that version at start.
    ``on_swap(new, old)`` is called after each swap of the served model
    (``old`` is ``None`` the first time), on the thread that swapped; an
    exception it raises is logged and ignored. ``load_timeout_s`` bounds one
    checkpoint read; ``window_bytes`` the chunks kept while following;
    ``consumer_options`` are passed to both of its kafka-python consumers
    (no group; one catches up and fetches chunks, one follows).

    Use it as a context manager (started on entry if not already, stopped
    on exit), or call :meth:`start` and :meth:`stop`::

        with CheckpointSubscriber(settings, public_keys_from_settings(settings)) as sub:
            prediction = sub.current.predict_one({"age": 41.0})
    """

    def __init__(
        self,
        settings: Settings,
        public_keys: PublicKeys,
        *,
        model: str | None = None,
        on_swap: Callable[[ServedModel, ServedModel | None], None] | None = None,
        metrics: Metrics | None = None,
        poll_timeout_ms: int = 200,
        load_timeout_s: float = 60.0,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.public_keys: list[Ed25519PublicKey] = key_list(public_keys)
        if not self.public_keys:
            raise ValueError("no public key: the subscriber could verify no checkpoint")
        self.model = model or settings.serving_model or settings.trainer_model
        self.topic = settings.topic_models
        self.on_swap = on_swap
        self.metrics = metrics or Metrics()
        self.poll_timeout_ms = poll_timeout_ms
        self.load_timeout_s = load_timeout_s
        self.window_bytes = window_bytes
        self.consumer_options = dict(consumer_options or {})  # kafka-python options for both consumers
        self._model_b = self.model.encode()
        self._lock = threading.Lock()  # swap decisions and counters; predict never takes it
        self._io_lock = threading.RLock()  # the loader consumer (the thread and pin() share it)
        self._stop = threading.Event()
        self._first = threading.Event()  # set once a model is current
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self._current: ServedModel | None = None
        self._followed: ServedModel | None = None  # newest good version seen; == current unless pinned
        self._pinned: int | None = self.settings.serving_pin_version
        self._pin_due: float | None = 0.0 if self._pinned is not None else None  # settings pin not yet loaded
        self._follower: _Counting | None = None
        self._loader: _Counting | None = None
        self._closed_records = [0, 0]  # records read by clients closed since (follower, loader)
        self._positioned = False
        self._window = ChunkWindow(self.window_bytes)  # this model's chunks read while following
        self._next_refresh = 0.0
        self._swaps = 0
        self._failures = 0
        self._failures_by_reason: dict[str, int] = {}
        self._last_error: str | None = None
        self._last_swap_at: float | None = None
        self._stale = 0
        self._catch_up: dict[str, Any] = {}
        self._catch_up_total = 0  # records read by every catch-up so far

    # -- the public surface ------------------------------------------------------------

    @property
    def current(self) -> ServedModel | None:
        """The model to serve now (``None`` until the first one is loaded); one attribute read."""
        return self._current

    @property
    def version(self) -> int | None:
        """The version served now, or ``None``."""
        current = self._current
        return current.version if current is not None else None

    def start(self, wait_s: float | None = 30.0) -> CheckpointSubscriber:
        """Start following on a background thread; return ``self``.

        With ``wait_s``, block until a first model is current; if none is
        within ``wait_s`` seconds, stop and raise
        :class:`~stream_learner.checkpoint.errors.CheckpointNotFoundError`
        (no checkpoint of the model on the topic) or
        :class:`~stream_learner.checkpoint.errors.CheckpointError` naming
        the last failure.
        """
        if self._thread is not None:
            raise RuntimeError("the subscriber is already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-subscriber-{self.model}", daemon=True)
        self._thread.start()
        if not wait_s or self._first.wait(wait_s):
            return self
        self.stop()
        where = f"model {self.model!r} on topic {self.topic!r}"
        if self._last_error is None or self._last_error.startswith("not_found:"):
            raise CheckpointNotFoundError(f"no checkpoint of {where} within {wait_s:g}s"
                                          + (f"; {self._last_error}" if self._last_error else ""))
        raise CheckpointError(f"no servable checkpoint of {where} within {wait_s:g}s; last error: {self._last_error}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop following and close the Kafka clients; ``current`` stays as it was."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("subscriber_stop_timeout", model=self.model, timeout_s=timeout_s)
                return  # the thread closes its clients when it ends
        self._close_clients()

    def __enter__(self) -> CheckpointSubscriber:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pin(self, version: int, *, timeout_s: float | None = None) -> ServedModel:
        """Serve ``version`` (verified and loaded like any other) and stop serving newer ones.

        Returns the pinned model, current when this returns. Raises (and
        counts) what loading it raised, leaving the served model and any
        previous pin unchanged. Newer versions keep being verified and
        loaded in the background; :meth:`unpin` serves the newest again.
        """
        started = time.monotonic()
        try:
            with self._io_lock:
                loader = self._clients()[1]
                checkpoint = read_version(loader, self.topic, self.public_keys, version, self.model,
                                          timeout_s=timeout_s or self.load_timeout_s)
            served = load_served_model(checkpoint)
        except Exception as exc:
            self._failed(exc, what=f"pin to v{version}")
            raise
        with self._lock:
            self._pinned = version
            self._pin_due = None
            old = self._current
            if old is not None and old.version == version:
                return old
            new = self._make_current(served)
        log.info("model_pinned", model=self.model, version=version, previous=old.version if old else None)
        self._swapped(new, old, started)
        return new

    #: Rolling back is pinning an older version: :meth:`pin` under the name operators look for.
    rollback = pin

    def unpin(self) -> None:
        """Serve the newest good version again, and follow newer ones (a no-op if not pinned)."""
        with self._lock:
            if self._pinned is None:
                return
            self._pinned, self._pin_due = None, None
            old, followed = self._current, self._followed
            if followed is None or (old is not None and old.version >= followed.version):
                # Pinned at the newest (or newer than the follower got to): keep
                # it, and never follow below it.
                if old is not None:
                    self._followed = old
                new = None
            else:
                new = self._make_current(followed)
        log.info("model_unpinned", model=self.model, version=(new or old).version if (new or old) else None)
        if new is not None:
            self._swapped(new, old, time.monotonic())

    def status(self) -> dict[str, Any]:
        """What an operator wants to see (JSON-able).

        ``version`` served, ``pinned`` version or ``None``, ``followed_version``
        (the newest good version, served unless pinned), ``swaps``,
        ``failures`` (and ``failures_by_reason``), ``last_error``
        (``"reason: message"`` or ``None``), ``last_swap_at`` (``time.time()``),
        ``stale_manifests`` ignored, and the work done: ``catch_up`` (records
        read, seconds, CPU seconds), ``records_followed``, ``records_fetched``.
        """
        with self._lock:
            current, followed = self._current, self._followed
            follower, loader = self._follower, self._loader
            return {
                "model": self.model,
                "topic": self.topic,
                "version": current.version if current else None,
                "pinned": self._pinned,
                "followed_version": followed.version if followed else None,
                "swaps": self._swaps,
                "failures": self._failures,
                "failures_by_reason": dict(self._failures_by_reason),
                "last_error": self._last_error,
                "last_swap_at": self._last_swap_at,
                "stale_manifests": self._stale,
                "running": self._thread is not None and self._thread.is_alive(),
                "catch_up": dict(self._catch_up),
                # Locals: the loop may close (and None) its clients meanwhile.
                "records_followed": self._closed_records[0] + (follower.records if follower else 0),
                "records_fetched": self._closed_records[1] + (loader.records if loader else 0) - self._catch_up_total,
            }

    def poll_once(self) -> bool:
        """One step of the loop on the caller's thread (catch-up first); True if it swapped.

        Failures are handled as on the thread (counted, ``last_error``), not
        raised; the caller decides when to step again. Not while started.
        """
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the subscriber's thread is running; poll_once is for callers without one")
        try:
            return self._step()
        except Exception as exc:  # noqa: BLE001 - the same policy as the thread
            self._failed(exc)
            return False

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.0
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                    delay = 0.0
                except Exception as exc:  # noqa: BLE001 - the thread must never die
                    self._failed(exc)
                    delay = min(max(delay * 2, BACKOFF_S[0]), BACKOFF_S[1])
                    self._stop.wait(delay)
        finally:
            self._close_clients()

    def _clients(self) -> tuple[_Counting, _Counting]:
        with self._io_lock:
            if self._loader is None:
                self._loader = _Counting(make_reader_consumer(self.settings, **self.consumer_options))
            if self._follower is None:
                self._follower = _Counting(make_reader_consumer(self.settings, **self.consumer_options))
            return self._follower, self._loader

    def _close_clients(self) -> None:
        with self._io_lock:
            for name in ("_follower", "_loader"):
                client = getattr(self, name)
                if client is None:
                    continue
                try:
                    client.inner.close()
                except Exception as exc:  # noqa: BLE001 - closing is best effort
                    log.debug("subscriber_close_failed", client=name, error=str(exc))
                self._closed_records[name == "_loader"] += client.records
                setattr(self, name, None)
            # A restart makes new clients and catches up again (never below the followed version).
            self._positioned = False

    def _step(self) -> bool:
        follower, _ = self._clients()
        if not self._positioned:
            return self._catch_up_step(follower)
        swapped = False
        if self._pin_due is not None and time.monotonic() >= self._pin_due:
            swapped = self._pin_from_settings()
        if time.monotonic() >= self._next_refresh:
            self._refresh_partitions(follower)
        return self._follow(follower) or swapped

    def _catch_up_step(self, follower: _Counting) -> bool:
        """Load the newest checkpoint from the end of the topic and position the follower after it."""
        partitions = follower.partitions_for_topic(self.topic)
        if not partitions:
            raise CheckpointNotFoundError(f"topic {self.topic!r} does not exist or has no partitions (yet)")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        # End offsets before the read: whatever is appended meanwhile is followed, not missed.
        positions: dict[TopicPartition, int] = dict(follower.end_offsets(tps))
        started, cpu = time.monotonic(), time.thread_time()
        with self._io_lock:
            loader = self._clients()[1]
            before = loader.records
            served: ServedModel | None = None
            try:
                checkpoint = read_latest(loader, self.topic, self.public_keys, self.model,
                                         timeout_s=self.load_timeout_s)
            except CheckpointNotFoundError:
                checkpoint = None
                log.info("no_checkpoint_yet", model=self.model, topic=self.topic)
            except Exception as exc:
                if is_transient(exc):
                    raise  # not positioned: the whole catch-up is retried after a back-off
                # The newest checkpoint is refused; nothing older is served in its place.
                checkpoint = None
                self._failed(exc, what="newest checkpoint")
            finally:
                self._catch_up_total += loader.records - before
                self._catch_up = {"records": loader.records - before,
                                  "seconds": round(time.monotonic() - started, 6),
                                  "cpu_seconds": round(time.thread_time() - cpu, 6)}
        if checkpoint is not None:
            positions[TopicPartition(self.topic, checkpoint.partition)] = checkpoint.offset + 1
            try:
                served = load_served_model(checkpoint)
            except Exception as exc:  # noqa: BLE001 - refused like any other; the next version may do
                self._failed(exc, what="newest checkpoint")
        follower.assign(tps)
        for tp, offset in positions.items():
            follower.seek(tp, offset)
        self._positioned = True
        self._next_refresh = time.monotonic() + PARTITION_REFRESH_S
        log.info("subscriber_positioned", model=self.model, version=served.version if served else None,
                 positions={tp.partition: o for tp, o in positions.items()}, **self._catch_up)
        return self._offer(served, started) if served is not None else False

    def _refresh_partitions(self, follower: _Counting) -> None:
        """Follow partitions added to the topic since, from their beginning (all of it is new)."""
        self._next_refresh = time.monotonic() + PARTITION_REFRESH_S
        partitions = follower.partitions_for_topic(self.topic) or set()
        assigned = set(follower.assignment())
        added = [TopicPartition(self.topic, p) for p in sorted(partitions)
                 if TopicPartition(self.topic, p) not in assigned]
        if added:
            follower.assign(sorted(assigned | set(added)))  # kafka-python keeps the others' positions
            follower.seek_to_beginning(*added)
            log.info("subscriber_partitions_added", model=self.model, partitions=[tp.partition for tp in added])

    def _follow(self, follower: _Counting) -> bool:
        """One poll: keep this model's chunks, load each newer manifest."""
        batch = follower.poll(timeout_ms=self.poll_timeout_ms)
        read_at = time.monotonic()
        swapped = False
        items = list(batch.items())
        for n, (tp, records) in enumerate(items):
            for record in records:
                if record_header(record, H_MODEL) != self._model_b:
                    continue
                kind = record_header(record, H_TYPE)
                if kind == TYPE_CHUNK:
                    followed = self._followed
                    self._window.keep(record, followed=followed.version if followed is not None else None)
                elif kind == TYPE_MANIFEST:
                    try:
                        swapped = self._on_manifest(record, read_at) or swapped
                    except Exception as exc:
                        if not is_transient(exc):
                            raise
                        # The broker failed us mid-load: read this manifest (and
                        # whatever this poll returned after it) again after a back-off.
                        follower.seek(tp, record.offset)
                        for later_tp, later in items[n + 1:]:
                            follower.seek(later_tp, later[0].offset)
                        raise
        return swapped

    def _on_manifest(self, record: Any, read_at: float) -> bool:
        version, followed = header_version(record), self._followed
        # A version that does not parse is loaded anyway: verification refuses headers that disagree
        # with the manifest. Headers are not signed, but for the same reason skipping on the header
        # is safe.
        if version is not None and followed is not None and version <= followed.version:
            with self._lock:
                self._stale += 1
            self.metrics.serving_stale_manifests.inc()
            (log.info if version == followed.version else log.warning)(
                "stale_manifest_ignored", model=self.model, version=version, followed=followed.version,
                partition=record.partition, offset=record.offset)
            self._drop_chunks(record.partition, record.offset, followed.version)
            return False
        try:
            with self._io_lock:
                checkpoint = load_manifest_record(self._clients()[1], record, self.public_keys,
                                                  window=self._window.chunks(record.partition),
                                                  timeout_s=self.load_timeout_s)
            served = load_served_model(checkpoint)
        except Exception as exc:
            if is_transient(exc):
                raise
            self._drop_chunks(record.partition, record.offset, version)
            self._failed(exc, what=f"v{version}" if version is not None else "manifest",
                         partition=record.partition, offset=record.offset)
            return False
        self._drop_chunks(record.partition, record.offset, served.version)
        return self._offer(served, read_at)

    def _drop_chunks(self, partition: int, offset: int, version: int | None) -> None:
        """Forget the window's chunks before a handled manifest that no manifest to come needs."""
        followed = self._followed
        self._window.forget(partition, before=offset, version=version,
                            followed=followed.version if followed is not None else None)

    def _pin_from_settings(self) -> bool:
        version = self._pinned
        if version is None:
            self._pin_due = None
            return False
        try:
            before = self._swaps
            self.pin(version)
            return self._swaps > before
        except Exception:  # noqa: BLE001 - counted by pin(); retried later
            self._pin_due = time.monotonic() + 30.0
            return False

    # -- swapping ---------------------------------------------------------------------------

    def _make_current(self, served: ServedModel) -> ServedModel:
        """The swap itself; the caller holds ``_lock`` and calls :meth:`_swapped` after releasing it."""
        new = dataclasses.replace(served, loaded_at=time.time())
        self._current = new  # the one reference assignment requests observe
        if self._followed is None or new.version > self._followed.version:
            self._followed = new
        self._swaps += 1
        self._last_swap_at = new.loaded_at
        return new

    def _offer(self, served: ServedModel, read_at: float) -> bool:
        """A newly loaded version, from following: swap it in unless older or pinned."""
        with self._lock:
            followed = self._followed
            if followed is not None and served.version <= followed.version:
                self._stale += 1
                return False  # a concurrent pin got there first; never go back
            if self._pinned is not None:
                self._followed = served
                log.info("newer_version_loaded_while_pinned", model=self.model, version=served.version,
                         pinned=self._pinned)
                return False
            old = self._current
            new = self._make_current(served)
        self._swapped(new, old, read_at)
        return True

    def _swapped(self, new: ServedModel, old: ServedModel | None, read_at: float) -> None:
        seconds = time.monotonic() - read_at
        self.metrics.serving_version.set(new.version)
        self.metrics.serving_swaps.inc()
        self.metrics.serving_swap_seconds.observe(seconds)
        log.info("model_swapped", model=self.model, version=new.version,
                 previous=old.version if old is not None else None, seconds=round(seconds, 4),
                 partition=new.partition, offset=new.offset)
        if self.on_swap is not None:
            try:
                self.on_swap(new, old)
            except Exception:  # noqa: BLE001 - a callback must not stop the subscriber
                log.exception("on_swap_failed", model=self.model, version=new.version)
        # After the callback: start() returns once the first swap is fully handled.
        self._first.set()

    def _failed(self, exc: BaseException, *, what: str = "", **context: Any) -> None:
        reason = failure_reason(exc)
        message = f"{reason}: {exc}"
        with self._lock:
            self._failures += 1
            self._failures_by_reason[reason] = self._failures_by_reason.get(reason, 0) + 1
            self._last_error = message
        self.metrics.serving_swap_failures.labels(reason=reason).inc()
        log.warning("checkpoint_refused" if reason != "broker" else "subscriber_broker_error",
                    model=self.model, what=what or None, reason=reason, error=str(exc),
                    served=self.version, **context)
