"""Which version a subscriber serves: its own pin, else the registry's pin, else its alias's version, else the newest.

:class:`VersionChoice` holds the state behind that choice: this node's pin
(:meth:`~VersionChoice.pin`, or ``serving_pin_version``, loaded by the loop
and tried again every :data:`PIN_RETRY_S` while it fails), what the
registry says (:meth:`~VersionChoice.follow_registry`, at each loop step
once the registry changed; a version it names that failed to load is tried
again after :data:`REGISTRY_RETRY_S`) and why nothing is served when an
alias is not set. The swap itself is always
:class:`~stream_learner.serving.versions.ServedVersions`' decision, and what
follows one (metrics, logs, ``on_swap``) the subscriber's ``swapped``.

No lock: the pin fields are written by the loop and by callers of
``pin``/``unpin``; a write that loses a race at worst re-reads the version
pinned, or finds no pin.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from ..checkpoint.errors import CheckpointNotFoundError
from .failures import Failed, is_transient
from .model import ServedModel
from .registry import RegistryFollower
from .telemetry import ServingMetrics
from .versions import ServedVersions, Swap

log = structlog.get_logger(__name__)

__all__ = ["VersionChoice"]

#: How long before a pin from the settings that failed is tried again (seconds).
PIN_RETRY_S = 30.0
#: How long before a version the registry names that failed to load is tried again (seconds): its
#: manifest may be in another partition than the registry record, read a little later.
REGISTRY_RETRY_S = 5.0

#: Load one version by number (verified; at most ``timeout_s``, else the subscriber's default).
LoadVersion = Callable[[int, float | None], ServedModel]
#: After a swap, outside the lock, with the monotonic time the work for it began.
Swapped = Callable[[Swap, float], None]


class VersionChoice:
    """This node's pin and the registry's word on what to serve (module docstring)."""

    def __init__(
        self,
        model: str,
        topic: str,
        versions: ServedVersions,
        *,
        registry: RegistryFollower | None,
        alias: str | None,
        pinned: int | None,
        load: LoadVersion,
        swapped: Swapped,
        failed: Failed,
        telemetry: ServingMetrics,
    ) -> None:
        self.model = model
        self.topic = topic
        self.versions = versions
        self.registry = registry
        self.alias = alias
        self.load = load
        self.swapped = swapped
        self.failed = failed
        self.telemetry = telemetry
        self.local_pin: int | None = pinned  # pin() / serving_pin_version: above the registry
        # When the loop loads the settings' pin (None: loaded, or overridden by pin/unpin).
        self.pin_due: float | None = 0.0 if pinned is not None else None
        self.direct_due: float | None = None  # when to try again a version the registry names that failed
        self.waiting: str | None = None  # why nothing (newer) is served: an alias not set

    # -- this node's pin ----------------------------------------------------------------------

    def pin(self, version: int, *, timeout_s: float | None = None) -> ServedModel:
        """Serve ``version`` and stop serving newer ones; the pinned model (see ``CheckpointSubscriber.pin``)."""
        started = time.monotonic()
        try:
            served = self.load(version, timeout_s)
        except Exception as exc:
            self.failed(exc, what=f"pin to v{version}")
            raise
        self.local_pin = version
        current, swap = self.versions.pin(served)
        self.pin_due = None
        if swap is not None:
            log.info("model_pinned", model=self.model, version=version, previous=swap.old.version if swap.old else None)
            self.swapped(swap, started)
        return current

    def unpin(self) -> None:
        """Undo :meth:`pin` (see ``CheckpointSubscriber.unpin``)."""
        self.pin_due = None
        self.local_pin = None
        if self.registry is not None and self.target()[0] != "newest":
            self.direct_due = 0.0  # the loop serves what the registry names at its next step
            return
        unpinned = self.versions.unpin()
        if unpinned is None:
            return
        current, swap = unpinned
        log.info("model_unpinned", model=self.model, version=current.version if current else None)
        if swap is not None:
            self.swapped(swap, time.monotonic())

    def pin_from_settings(self) -> bool:
        """Load the settings' pin when it is due (the loop's step); True if swapped."""
        if self.pin_due is None or time.monotonic() < self.pin_due:
            return False
        version = self.versions.pinned
        if version is None:
            self.pin_due = None
            return False
        try:
            before = self.versions.swaps
            self.pin(version)
            return self.versions.swaps > before
        except Exception:  # noqa: BLE001 - counted by pin(); retried later
            self.pin_due = time.monotonic() + PIN_RETRY_S
            return False

    # -- the registry ------------------------------------------------------------------------

    def target(self) -> tuple[str, str, int | None]:
        """What the registry says to serve: (``newest`` | ``version`` | ``wait``, why, the version)."""
        registry = self.registry
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

    def serving_by(self) -> str:
        """Why the served version is served (``status()["serving_by"]``)."""
        return self.target()[1] if self.local_pin is None else f"local pin v{self.local_pin}"

    def follow_registry(self) -> bool:
        """Serve what the registry says, when it changed (or a load it asked for is due again); True if swapped."""
        registry = self.registry
        if registry is None:
            return False
        changed = registry.take_changed()
        if not changed and (self.direct_due is None or time.monotonic() < self.direct_due):
            return False
        self.direct_due = None
        self._report_registry()
        if self.local_pin is not None:
            return False  # a pin on this node (pin(), serving_pin_version) wins over the registry
        kind, why, version = self.target()
        if kind == "wait":
            if registry.ready and why != self.waiting:
                log.warning("registry_alias_not_set", model=self.model, alias=self.alias, detail=why)
            self.waiting = why if registry.ready else None
            self.versions.hold_newer()
            return False
        self.waiting = None
        started = time.monotonic()
        if kind == "newest":
            unpinned = self.versions.unpin()
            if unpinned is None or unpinned[1] is None:
                return False
            log.info("registry_follows_newest", model=self.model, version=unpinned[1].new.version)
            self.swapped(unpinned[1], started)
            return True
        assert version is not None
        current = self.versions.current
        if self.versions.pinned == version and current is not None and current.version == version:
            return False
        try:
            served = self.load(version, None)
        except Exception as exc:  # noqa: BLE001 - counted; the last good model keeps serving
            if is_transient(exc) or isinstance(exc, CheckpointNotFoundError):
                self.direct_due = time.monotonic() + REGISTRY_RETRY_S
            self.failed(exc, what=f"{why} (registry)")
            return False
        _, swap = self.versions.pin(served)
        log.info("registry_applied", model=self.model, serving=why, version=version)
        if swap is not None:
            self.swapped(swap, started)
        return swap is not None

    def _report_registry(self) -> None:
        registry = self.registry
        if registry is None:
            return
        state = registry.state
        self.telemetry.registry_seq.set(state.seq if state is not None else 0)
        self.telemetry.registry_pin_version.set((state.pin or 0) if state is not None else 0)
        if self.alias:
            version = state.aliases.get(self.alias) if state is not None else None
            self.telemetry.alias_version.labels(alias=self.alias).set(version or 0)
