"""Follow one model on the model topic: :class:`CheckpointSubscriber`.

What it does, in order (catch up, follow, load, swap), and what it
guarantees (never backwards, failures, threads, trust) is the package's
contract: see :mod:`stream_learner.serving`. The work is split by who may
touch what, which is also what each lock guards:

* the loop (:meth:`CheckpointSubscriber.start`'s thread, or the caller of
  :meth:`~CheckpointSubscriber.poll_once`) alone uses the
  :class:`~stream_learner.serving.follower.TopicFollower`: the follower
  consumer, its position and the chunk window, so they need no lock
  (:meth:`~CheckpointSubscriber.stop` closes the consumers once the loop
  has ended);
* the loader consumer is shared by the loop and callers of
  :meth:`~CheckpointSubscriber.pin`: it is used only under the lock of
  :class:`~stream_learner.serving.clients.ReaderClients`;
* every swap decision, and the counters :meth:`~CheckpointSubscriber.status`
  reports, are :class:`~stream_learner.serving.versions.ServedVersions`'
  under its own lock, which may be taken while the clients' lock is held,
  never the other way round. A request takes neither: ``current`` is one
  attribute read;
* which version to ask for (this node's pin, the registry's word) is
  :class:`~stream_learner.serving.choice.VersionChoice`'s, without a lock.

Loading (verifying, building, the smoke prediction) happens before a swap
is offered; metrics, logs and ``on_swap`` run after it, outside the locks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Self

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..checkpoint.errors import CheckpointError, CheckpointNotFoundError
from ..checkpoint.reader import read_version
from ..checkpoint.scan import ScanLimits
from ..checkpoint.verify import PublicKeys, key_list
from ..config import Settings
from ..errors import ConfigError
from ..metrics import Metrics
from ..util.backoff import Backoff
from .choice import VersionChoice
from .clients import ReaderClients
from .failures import failure_reason
from .follower import TopicFollower
from .model import ServedModel, load_served_model
from .registry import RegistryFollower
from .state import FloorStore, RegistryStore
from .telemetry import LogLimiter, serving_metrics
from .trust import load_rules
from .variant import VariantFollower
from .versions import ServedVersions, Swap

log = structlog.get_logger(__name__)

__all__ = ["CheckpointSubscriber"]

#: Chunks of versions not yet loaded that the follower keeps in memory, at
#: most (bytes). A manifest's chunks that fell out are fetched by offset.
DEFAULT_WINDOW_BYTES = 64 * 1024 * 1024

#: Back-off after a broker error: doubles from the first value up to the second (seconds).
BACKOFF_S = (0.2, 5.0)

OnSwap = Callable[[ServedModel, ServedModel | None], None]


class CheckpointSubscriber:
    """Follows one model on the model topic and keeps its newest good version current.

    See :mod:`stream_learner.serving` for what it does and guarantees.
    ``model`` defaults to ``settings.serving_model``, then
    ``settings.trainer_model``; ``settings.serving_pin_version``, if set,
    pins that version at start. ``on_swap(new, old)`` is called after each
    swap of the served model (``old`` is ``None`` the first time), on the
    thread that swapped; an exception it raises is logged and ignored.
    ``load_timeout_s`` bounds one checkpoint read; ``window_bytes`` the
    chunks kept while following; ``consumer_options`` are passed to both of
    its kafka-python consumers (no group; one catches up and fetches chunks,
    one follows).

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
        on_swap: OnSwap | None = None,
        metrics: Metrics | None = None,
        poll_timeout_ms: int = 200,
        load_timeout_s: float = 60.0,
        window_bytes: int | None = None,
        consumer_options: Mapping[str, Any] | None = None,
        variant: str | None = None,
        alias: str | None = None,
        registry: bool | None = None,
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
        self.window_bytes = window_bytes if window_bytes is not None else settings.serving_window_bytes
        self._clients = ReaderClients(settings, consumer_options, receive_limit=settings.serving_max_record_bytes)
        self.consumer_options = self._clients.options
        self.alias = (alias if alias is not None else settings.serving_alias) or None
        use_registry = settings.serving_registry if registry is None else registry
        if self.alias and not use_registry:
            raise ConfigError(f"serving_alias={self.alias!r} needs serving_registry=true: aliases are registry records")
        # The registry (aliases, a fleet-wide pin; serving/registry.py): until its start search is done,
        # nothing is served, since it may name another version than the newest.
        self._registry = (
            RegistryFollower(
                settings.topic_models,
                self.public_keys,
                self.model,
                RegistryStore(settings.serving_state_dir or None, settings.topic_models, self.model),
                self._failed,
                ScanLimits(max_records=settings.serving_scan_max_records, max_bytes=settings.serving_scan_max_bytes),
            )
            if use_registry
            else None
        )
        self._versions = ServedVersions(pinned=settings.serving_pin_version, hold=self._registry is not None)
        self.policy, self.load_limits = load_rules(settings)
        self.telemetry = serving_metrics(self.metrics)
        self._log_limiter = LogLimiter()
        floor = FloorStore(settings.serving_state_dir or None, self.topic, self.model)
        self._stop = threading.Event()
        self._first = threading.Event()  # set once a model is current
        self._thread: threading.Thread | None = None
        self._choice = VersionChoice(
            self.model,
            self.topic,
            self._versions,
            registry=self._registry,
            alias=self.alias,
            pinned=settings.serving_pin_version,
            load=self._load_version,
            swapped=self._swapped,
            failed=self._failed,
            telemetry=self.telemetry,
        )
        self._topic_follower = TopicFollower(
            self,
            self._clients,
            self._versions,
            window_bytes=self.window_bytes,
            offer=self._offer,
            failed=self._failed,
            window_records=settings.serving_window_records,
            scan_limits=ScanLimits(
                max_records=settings.serving_scan_max_records, max_bytes=settings.serving_scan_max_bytes
            ),
            load_limits=self.load_limits,
            policy=self.policy,
            floor=floor,
            telemetry=self.telemetry,
            registry=self._registry,
        )
        self.telemetry.floor_version.set(self._topic_follower.floor_version)
        # A serving variant (serving_variant; "" for none whatever the settings say): see serving/variant.py.
        variant = settings.serving_variant if variant is None else variant
        self._variant = VariantFollower(self, variant, settings.serving_variant_max_lag) if variant else None

    # -- the public surface ------------------------------------------------------------

    @property
    def current(self) -> ServedModel | None:
        """The model to serve now (``None`` until the first one is loaded); one attribute read (two when
        following a variant: the variant or its parent, each a whole model)."""
        if self._variant is not None:
            return self._variant.current(self._versions.current)
        return self._versions.current

    @property
    def floor_version(self) -> int:
        """The highest good version this node knows (0: none); it serves nothing lower."""
        return self._topic_follower.floor_version

    @property
    def version(self) -> int | None:
        """The version served now, or ``None``."""
        current = self.current
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
        if self._variant is not None:
            self._variant.inner.start(wait_s=None)  # the parent serves until a variant is loaded
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-subscriber-{self.model}", daemon=True)
        self._thread.start()
        if not wait_s or self._first.wait(wait_s):
            return self
        self.stop()
        where = f"model {self.model!r} on topic {self.topic!r}"
        if self._choice.waiting is not None:
            raise CheckpointNotFoundError(f"nothing to serve of {where} within {wait_s:g}s: {self._choice.waiting}")
        last_error = self._versions.last_error
        if last_error is None or last_error.startswith("not_found:"):
            detail = self._topic_follower.problem or last_error
            raise CheckpointNotFoundError(
                f"no checkpoint of {where} within {wait_s:g}s" + (f"; {detail}" if detail else "")
            )
        raise CheckpointError(f"no servable checkpoint of {where} within {wait_s:g}s; last error: {last_error}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop following and close the Kafka clients; ``current`` stays as it was."""
        self._stop.set()
        if self._variant is not None:
            self._variant.inner.stop(timeout_s)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("subscriber_stop_timeout", model=self.model, timeout_s=timeout_s)
                return  # the thread closes its clients when it ends
        self._close_clients()

    def __enter__(self) -> Self:
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
        return self._choice.pin(version, timeout_s=timeout_s)

    def _load_version(self, version: int, timeout_s: float | None) -> ServedModel:
        """``version`` verified and loaded (the one followed, or served, if it is that one)."""
        for known in (self._versions.followed, self._versions.current):
            if known is not None and known.version == version and known.manifest.signature is not None:
                return known
        with self._clients.loading() as loader:
            checkpoint = read_version(
                loader,
                self.topic,
                self.public_keys,
                version,
                self.model,
                timeout_s=timeout_s or self.load_timeout_s,
                limits=self.load_limits,
            )
        return load_served_model(checkpoint, self.policy)

    #: Rolling back is pinning an older version: :meth:`pin` under the name operators look for.
    rollback = pin

    def unpin(self) -> None:
        """Undo :meth:`pin`: serve what the registry says (the newest good version if it says nothing), and
        follow newer ones (a no-op if not pinned). At once, unless the registry's start search is not done:
        then the loop serves what it finds once it is (not the newest meanwhile: a fleet-wide pin may hold)."""
        self._choice.unpin()

    def status(self) -> dict[str, Any]:
        """What an operator wants to see (JSON-able).

        ``version`` served, ``pinned`` version or ``None``, ``followed_version``
        (the newest good version, served unless pinned), ``swaps``,
        ``failures`` (and ``failures_by_reason``), ``last_error``
        (``"reason: message"`` or ``None``), ``last_swap_at`` (``time.time()``),
        ``stale_manifests`` ignored, ``floor_version`` (the highest good
        version this node knows: it serves nothing lower, and remembers it
        in ``serving_state_dir``), ``highest_verified_version`` (the highest
        validly signed version seen), ``skipped_records`` and
        ``last_skipped`` (records too large to receive, moved past),
        ``window`` (chunk records and bytes held), and the work done:
        ``catch_up`` (the start scan: records and bytes read, done,
        exhausted, seconds, CPU seconds), ``records_followed``,
        ``records_fetched``.
        """
        status = {
            "model": self.model,
            "topic": self.topic,
            **self._versions.counts(),
            "running": self._thread is not None and self._thread.is_alive(),
            **self._topic_follower.status(),
        }
        if self._variant is not None:
            status["variant"] = self._variant.status(self._versions.current)
            status["version"] = self.version
        status["alias"] = self.alias
        status["serving_by"] = self._choice.serving_by()
        status["registry"] = self._registry.status() if self._registry is not None else None
        status["problem"] = self.problem
        return status

    @property
    def problem(self) -> str | None:
        """Why nothing is served, for an operator (``None`` while a model serves and nothing is amiss):
        an alias not set, a model the topic holds no checkpoint of (naming the ones it holds)."""
        if self._choice.waiting is not None:
            return self._choice.waiting
        if self.current is None:
            return self._topic_follower.problem
        return None

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
        backoff = Backoff(*BACKOFF_S)
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                    backoff.reset()
                except Exception as exc:  # noqa: BLE001 - the thread must never die
                    self._failed(exc)
                    backoff.sleep(self._stop)
        finally:
            self._close_clients()

    def _close_clients(self) -> None:
        self._clients.close()
        # A restart makes new consumers and catches up again (never below the followed version).
        self._topic_follower.positioned = False

    def _step(self) -> bool:
        follower = self._clients.open()
        if not self._topic_follower.positioned:
            return self._topic_follower.catch_up(follower) | self._choice.follow_registry()
        swapped = self._choice.pin_from_settings()
        swapped = self._topic_follower.follow(follower) or swapped
        return self._choice.follow_registry() or swapped

    # -- swapping ---------------------------------------------------------------------------

    def _offer(self, served: ServedModel, read_at: float) -> bool:
        """A newly loaded version, from following: swapped in unless older or pinned."""
        swap = self._versions.offer(served)
        if swap is not None:
            self._swapped(swap, read_at)
        elif self._versions.followed is served:  # newer, and remembered for unpin
            log.info(
                "newer_version_loaded_while_pinned",
                model=self.model,
                version=served.version,
                pinned=self._versions.pinned,
                held=self._versions.hold or None,  # the registry's start search, or an alias not set
            )
        return swap is not None

    def _swapped(self, swap: Swap, read_at: float) -> None:
        """After a swap, outside the lock: the floor, metrics, the log, ``on_swap``."""
        new, old = swap.new, swap.old
        followed = self._versions.followed
        if followed is not None:
            self._topic_follower.swapped_to(followed.version)
        seconds = time.monotonic() - read_at
        self.metrics.serving_version.set(new.version)
        self.metrics.serving_swaps.inc()
        self.metrics.serving_swap_seconds.observe(seconds)
        log.info(
            "model_swapped",
            model=self.model,
            version=new.version,
            previous=old.version if old is not None else None,
            seconds=round(seconds, 4),
            partition=new.partition,
            offset=new.offset,
        )
        if self._variant is not None:
            self._variant.report()
        if self.on_swap is not None:
            try:
                self.on_swap(new, old)
            except Exception:
                log.exception("on_swap_failed", model=self.model, version=new.version)
        # After the callback: start() returns once the first swap is fully handled.
        self._first.set()

    def _failed(self, exc: BaseException, *, what: str = "", **context: Any) -> None:
        reason = failure_reason(exc)
        self._versions.failed(reason, f"{reason}: {exc}")
        self.metrics.serving_swap_failures.labels(reason=reason).inc()
        # A topic writer can make a node refuse records by the hundred thousand: a few lines per
        # reason a minute, the others counted (the counter has them all).
        suppressed = self._log_limiter.allow(reason)
        if suppressed is None:
            return
        log.warning(
            "checkpoint_refused" if reason != "broker" else "subscriber_broker_error",
            model=self.model,
            what=what or None,
            reason=reason,
            error=str(exc)[:500],
            served=self.version,
            suppressed_since=suppressed or None,
            **context,
        )
