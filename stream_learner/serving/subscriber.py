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
  attribute read.

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
from ..checkpoint.reader import LoadLimits, PublicKeys, key_list, read_version
from ..checkpoint.scan import ScanLimits
from ..checkpoint.signing import load_public_key
from ..config import Settings
from ..errors import ConfigError
from ..learn.frozen import check_device, load_base
from ..metrics import Metrics
from ..util.backoff import Backoff
from .clients import ReaderClients
from .failures import failure_reason, is_transient
from .follower import TopicFollower
from .model import BuildPolicy, ServedModel, load_served_model
from .registry import RegistryFollower
from .state import FloorStore, RegistryStore
from .telemetry import LogLimiter, serving_metrics
from .variant import VariantFollower
from .versions import ServedVersions, Swap

log = structlog.get_logger(__name__)

__all__ = ["CheckpointSubscriber", "public_keys_from_settings"]

#: Chunks of versions not yet loaded that the follower keeps in memory, at
#: most (bytes). A manifest's chunks that fell out are fetched by offset.
DEFAULT_WINDOW_BYTES = 64 * 1024 * 1024

#: Back-off after a broker error: doubles from the first value up to the second (seconds).
BACKOFF_S = (0.2, 5.0)

#: How long before a pin from the settings that failed is tried again (seconds).
PIN_RETRY_S = 30.0
#: How long before a version the registry names that failed to load is tried again (seconds): its
#: manifest may be in another partition than the registry record, read a little later.
REGISTRY_RETRY_S = 5.0

OnSwap = Callable[[ServedModel, ServedModel | None], None]


def public_keys_from_settings(settings: Settings) -> list[Ed25519PublicKey]:
    """The trusted checkpoint keys named by ``serving_public_keys`` (PEM files).

    Raises :class:`~stream_learner.errors.ConfigError` if none is set, and
    :class:`~stream_learner.checkpoint.errors.SignatureError` for a file
    that is unreadable or not an Ed25519 public key.

    >>> public_keys_from_settings(Settings(serving_public_keys=[]))
    Traceback (most recent call last):
    ...
    stream_learner.errors.ConfigError: serving_public_keys is empty: give the PEM file of the trainer's public key
    """
    if not settings.serving_public_keys:
        raise ConfigError("serving_public_keys is empty: give the PEM file of the trainer's public key")
    return [load_public_key(path) for path in settings.serving_public_keys]


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
        self._local_pin: int | None = settings.serving_pin_version  # pin() / serving_pin_version: above the registry
        self._direct_due: float | None = None  # when to try again a version the registry names that failed
        self._waiting: str | None = None  # why nothing (newer) is served: an alias not set
        # The device and the frozen base are checked and loaded here, at start: a device this machine
        # lacks or a base file that cannot be read is a ConfigError now, never a failure mid-stream.
        device = check_device(settings.serving_device, what="serving_device")
        bases = (
            [load_base(settings.serving_base_weights, what="serving_base_weights").to(device)]
            if settings.serving_base_weights
            else []
        )
        self.policy = BuildPolicy.of(
            settings.serving_allowed_architectures, settings.serving_max_parameters, bases=bases, device=str(device)
        )
        self.load_limits = LoadLimits(
            max_bytes=settings.serving_max_model_bytes, max_tensors=settings.serving_max_tensors
        )
        self.telemetry = serving_metrics(self.metrics)
        self._log_limiter = LogLimiter()
        floor = FloorStore(settings.serving_state_dir or None, self.topic, self.model)
        self._stop = threading.Event()
        self._first = threading.Event()  # set once a model is current
        self._thread: threading.Thread | None = None
        # When the loop loads the settings' pin (None: loaded, or overridden by pin/unpin). No
        # lock: a write that loses a race at worst re-reads the version pinned, or finds no pin.
        self._pin_due: float | None = 0.0 if settings.serving_pin_version is not None else None
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
        self.telemetry.floor_version.set(self._topic_follower.scan.floor)
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
        return self._topic_follower.scan.floor

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
        if self._waiting is not None:
            raise CheckpointNotFoundError(f"nothing to serve of {where} within {wait_s:g}s: {self._waiting}")
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
        started = time.monotonic()
        try:
            served = self._load_version(version, timeout_s)
        except Exception as exc:
            self._failed(exc, what=f"pin to v{version}")
            raise
        self._local_pin = version
        current, swap = self._versions.pin(served)
        self._pin_due = None
        if swap is not None:
            log.info("model_pinned", model=self.model, version=version, previous=swap.old.version if swap.old else None)
            self._swapped(swap, started)
        return current

    def _load_version(self, version: int, timeout_s: float | None = None) -> ServedModel:
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
        self._pin_due = None
        self._local_pin = None
        if self._registry is not None and self._target()[0] != "newest":
            self._direct_due = 0.0  # the loop serves what the registry names at its next step
            return
        unpinned = self._versions.unpin()
        if unpinned is None:
            return
        current, swap = unpinned
        log.info("model_unpinned", model=self.model, version=current.version if current else None)
        if swap is not None:
            self._swapped(swap, time.monotonic())

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
        followed, loaded = self._clients.records()
        topic = self._topic_follower
        scan = topic.scan_status()
        skipped = topic.skipped.count + topic.scan.skipped.count
        last = topic.skipped.last or topic.scan.skipped.last
        status = {
            "model": self.model,
            "topic": self.topic,
            **self._versions.counts(),
            "running": self._thread is not None and self._thread.is_alive(),
            "floor_version": topic.scan.floor,
            "highest_verified_version": max(
                topic.scan.highest_verified or 0, self._versions.followed.version if self._versions.followed else 0
            )
            or None,
            "skipped_records": skipped,
            "last_skipped": {"partition": last[0], "offset": last[1]} if last else None,
            "window": {"records": len(topic.window), "bytes": topic.window.size},
            "catch_up": dict(scan),
            "records_followed": followed,
            "records_fetched": loaded - topic.catch_up_records,
        }
        if self._variant is not None:
            status["variant"] = self._variant.status(self._versions.current)
            status["version"] = self.version
        status["alias"] = self.alias
        status["serving_by"] = self._target()[1] if self._local_pin is None else f"local pin v{self._local_pin}"
        status["registry"] = self._registry.status() if self._registry is not None else None
        status["problem"] = self.problem
        return status

    @property
    def problem(self) -> str | None:
        """Why nothing is served, for an operator (``None`` while a model serves and nothing is amiss):
        an alias not set, a model the topic holds no checkpoint of (naming the ones it holds)."""
        if self._waiting is not None:
            return self._waiting
        if self.current is None:
            return self._topic_follower.problem
        return None

    # -- the registry ------------------------------------------------------------------------

    def _target(self) -> tuple[str, str, int | None]:
        """What the registry says to serve: (``newest`` | ``version`` | ``wait``, why, the version)."""
        registry = self._registry
        if registry is None:
            return "newest", "newest", None
        if not registry.ready:
            return "wait", "the registry's start search has not finished", None
        state = registry.state
        if state is not None and state.pin is not None:
            return "version", f"registry pin v{state.pin}", state.pin
        if self.alias:
            version = state.aliases.get(self.alias) if state is not None else None
            if version is None:
                why = (
                    f"alias {self.alias!r} of model {self.model!r} is not set on topic {self.topic!r} "
                    f"(stream-learner models alias {self.model} {self.alias} VERSION sets it)"
                )
                return "wait", why, None
            return "version", f"alias {self.alias} v{version}", version
        return "newest", "newest", None

    def _direct(self) -> bool:
        """Serve what the registry says, when it changed (or a load it asked for is due again); True if swapped."""
        registry = self._registry
        if registry is None:
            return False
        changed = registry.take_changed()
        if not changed and (self._direct_due is None or time.monotonic() < self._direct_due):
            return False
        self._direct_due = None
        self._report_registry()
        if self._local_pin is not None:
            return False  # a pin on this node (pin(), serving_pin_version) wins over the registry
        kind, why, version = self._target()
        if kind == "wait":
            if registry.ready and why != self._waiting:
                log.warning("registry_alias_not_set", model=self.model, alias=self.alias, detail=why)
            self._waiting = why if registry.ready else None
            self._versions.hold_newer()
            return False
        self._waiting = None
        started = time.monotonic()
        if kind == "newest":
            unpinned = self._versions.unpin()
            if unpinned is None or unpinned[1] is None:
                return False
            log.info("registry_follows_newest", model=self.model, version=unpinned[1].new.version)
            self._swapped(unpinned[1], started)
            return True
        assert version is not None
        current = self._versions.current
        if self._versions.pinned == version and current is not None and current.version == version:
            return False
        try:
            served = self._load_version(version)
        except Exception as exc:  # noqa: BLE001 - counted; the last good model keeps serving
            if is_transient(exc) or isinstance(exc, CheckpointNotFoundError):
                self._direct_due = time.monotonic() + REGISTRY_RETRY_S
            self._failed(exc, what=f"{why} (registry)")
            return False
        _, swap = self._versions.pin(served)
        log.info("registry_applied", model=self.model, serving=why, version=version)
        if swap is not None:
            self._swapped(swap, started)
        return swap is not None

    def _report_registry(self) -> None:
        registry = self._registry
        if registry is None:
            return
        state = registry.state
        self.telemetry.registry_seq.set(state.seq if state is not None else 0)
        self.telemetry.registry_pin_version.set((state.pin or 0) if state is not None else 0)
        if self.alias:
            version = state.aliases.get(self.alias) if state is not None else None
            self.telemetry.alias_version.labels(alias=self.alias).set(version or 0)

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
            return self._topic_follower.catch_up(follower) | self._direct()
        swapped = False
        if self._pin_due is not None and time.monotonic() >= self._pin_due:
            swapped = self._pin_from_settings()
        swapped = self._topic_follower.follow(follower) or swapped
        return self._direct() or swapped

    def _pin_from_settings(self) -> bool:
        version = self._versions.pinned
        if version is None:
            self._pin_due = None
            return False
        try:
            before = self._versions.swaps
            self.pin(version)
            return self._versions.swaps > before
        except Exception:  # noqa: BLE001 - counted by pin(); retried later
            self._pin_due = time.monotonic() + PIN_RETRY_S
            return False

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
