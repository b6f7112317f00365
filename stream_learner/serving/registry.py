"""A subscriber's side of the model registry: find the newest registry state at start, follow it.

Registry records (:mod:`stream_learner.checkpoint.registry`) set a model's
aliases and its fleet-wide pin. :class:`RegistryFollower` holds the state a
subscriber applies:

* **start**: a :class:`~stream_learner.checkpoint.registry.RegistryScan`
  reads partition 0 back from the end offset the follower starts at, one
  bounded step per loop step (with the loader, like the manifest scan),
  back to the newest valid record and its confirmation, to where this node
  searched before (:class:`~stream_learner.serving.state.RegistryStore`),
  or to the scan's bounds. Until it is done the subscriber serves nothing
  new (a pin or an alias may say another version than the newest);
* **records read while following** are verified at once; during the scan
  they wait for its verdict, and are taken then if written since the start
  or confirmed by it (the manifests' rule); afterwards a record is applied
  only if its ``seq`` is above the one applied (a replay is counted
  ``stale`` and ignored);
* every refusal (``signature``, ``invalid``, ``downgrade``,
  ``unconfirmed``) goes to the subscriber's ``failed``, counted like a
  forged manifest; nothing refused changes what is served.

The follower reads and writes it from the loop's thread alone; ``state`` is
read by other threads (status) as one attribute.
"""

from __future__ import annotations

from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..checkpoint.errors import CheckpointError
from ..checkpoint.fetch import Skipped
from ..checkpoint.registry import (
    REGISTRY_PARTITION,
    Found,
    RegistryRecord,
    RegistryScan,
    refusal_reason,
    verify_registry,
    verify_registry_record,
)
from ..checkpoint.scan import ScanLimits
from ..events import encode
from .failures import Refused
from .state import RegistryStore

log = structlog.get_logger(__name__)

__all__ = ["RegistryFollower"]

#: Registry records read while the start search runs, kept for its verdict, at most.
MAX_PENDING = 64


class RegistryFollower:
    """The registry state of one model as a subscriber follows it (see the module docstring).

    ``failed(exc, what=..., offset=...)`` counts a refusal (the subscriber's).
    """

    def __init__(
        self,
        topic: str,
        keys: list[Ed25519PublicKey],
        model: str,
        store: RegistryStore,
        failed: Any,
        limits: ScanLimits | None = None,
    ) -> None:
        self.topic, self.keys, self.model = topic, keys, model
        self.store = store
        self.failed = failed
        self.limits = limits or ScanLimits()
        self.applied: Found | None = None
        self.stale = 0  # replayed (or duplicated) records ignored while following
        self.changed = False  # set when the state changes; the subscriber takes it
        self.scan: RegistryScan | None = None
        self._start_end = 0
        self._pending: list[Found] = []  # verified while the scan ran
        floor, stop = self._load()
        self.floor, self.stop = floor, stop
        self.applied = floor

    def _load(self) -> tuple[Found | None, int]:
        saved = self.store.load()
        if saved is None:
            return None, 0
        data, offset, searched_to = saved
        if data is None:
            return None, searched_to
        try:
            import msgspec

            record = msgspec.json.decode(data, type=RegistryRecord)
            verify_registry(record, self.keys)
        except (msgspec.ValidationError, msgspec.DecodeError, CheckpointError) as exc:
            log.warning("serving_registry_state_refused", model=self.model, error=str(exc))
            return None, 0
        return Found(record, offset), searched_to

    # -- the state ------------------------------------------------------------------------

    @property
    def state(self) -> RegistryRecord | None:
        """The registry record applied (``None``: none)."""
        applied = self.applied
        return applied.record if applied is not None else None

    @property
    def ready(self) -> bool:
        """True once the start search is done (the state is the newest this node could verify)."""
        return self.scan is not None and self.scan.done

    def take_changed(self) -> bool:
        """True (once) if the state changed since the last call."""
        changed, self.changed = self.changed, False
        return changed

    # -- start ------------------------------------------------------------------------------

    def start(self, begin: int, end: int, *, skipped: Skipped | None = None) -> None:
        """The follower starts at ``end`` of partition 0: search back from there (records too large to
        receive counted in ``skipped``)."""
        self._start_end = end
        self.scan = RegistryScan(
            self.topic,
            self.keys,
            self.model,
            floor=self.floor,
            stop=self.stop,
            limits=self.limits,
            skipped=skipped if skipped is not None else Skipped(),
        )
        self.scan.start(begin, end)
        if self.scan.done:
            self._verdict()

    def step(self, loader: Any, *, prober: Any, deadline_s: float) -> None:
        """One bounded step of the start search (the caller holds the loader)."""
        scan = self.scan
        if scan is None or scan.done:
            return
        try:
            done = scan.step(loader, prober=prober, deadline_s=deadline_s)
        finally:
            self._report()
        if done:
            self._verdict()

    def observe(self, partition: int, records: list[Any], lo: int, hi: int) -> None:
        """A window the manifest scan read back from the same end: the search uses it instead of reading
        it again (see :meth:`RegistryScan.observe`)."""
        scan = self.scan
        if scan is None or scan.done or partition != REGISTRY_PARTITION:
            return
        scan.observe(records, lo, hi)
        self._report()
        if scan.done:
            self._verdict()

    def _report(self) -> None:
        if self.scan is not None:
            for refusal in self.scan.take_refusals():
                self.failed(Refused(refusal.reason, refusal.error), what="registry record", offset=refusal.offset)

    def _verdict(self) -> None:
        assert self.scan is not None
        scan = self.scan
        best = scan.found
        # Records followed during the scan: taken if written since the start, or confirmed by the scan.
        for found in self._pending:
            confirmed = found.record.log_end >= self._start_end or scan.reached <= found.record.log_end
            if not confirmed and not (scan.exhausted and self.floor is not None):
                self.failed(
                    Refused(
                        "unconfirmed",
                        CheckpointError(
                            f"registry record {self.model} seq {found.record.seq} at offset {found.offset}: "
                            f"written before the start, and the start search could not read back to its writer's end"
                        ),
                    ),
                    what="registry record",
                    offset=found.offset,
                )
                continue
            if best is None or found.record.seq > best.record.seq:
                best = found
        self._pending = []
        if scan.exhausted:
            log.warning(
                "registry_search_exhausted",
                model=self.model,
                records=scan.records,
                bytes=scan.bytes,
                found_seq=best.record.seq if best is not None else None,
            )
        self.applied = best
        searched_to = self._start_end if not scan.exhausted else self.stop
        self.store.save(
            encode(best.record) if best is not None else None, best.offset if best is not None else -1, searched_to
        )
        self.changed = True
        log.info(
            "registry_state",
            model=self.model,
            seq=best.record.seq if best is not None else None,
            aliases=best.record.aliases if best is not None else {},
            pin=best.record.pin if best is not None else None,
            records=scan.records,
        )

    # -- following --------------------------------------------------------------------------

    def followed(self, record: Any) -> None:
        """A registry record of this model read by the follower (partition 0 or not)."""
        try:
            found = Found(verify_registry_record(self.topic, record, self.keys), record.offset)
        except CheckpointError as exc:
            self.failed(Refused(refusal_reason(exc), exc), what="registry record", offset=record.offset)
            return
        if not self.ready:
            if len(self._pending) < MAX_PENDING:  # a writer replaying records by the thousand: bounded
                self._pending.append(found)
            return
        applied = self.applied
        if applied is not None and found.record.seq <= applied.record.seq:
            self.stale += 1
            (log.info if found.offset == applied.offset else log.warning)(
                "stale_registry_record_ignored",
                model=self.model,
                seq=found.record.seq,
                applied=applied.record.seq,
                offset=record.offset,
            )
            return
        self.applied = found
        self.store.save(encode(found.record), found.offset, found.offset + 1)
        self.changed = True
        log.info(
            "registry_changed",
            model=self.model,
            seq=found.record.seq,
            change=found.record.change,
            aliases=found.record.aliases,
            pin=found.record.pin,
        )

    def status(self) -> dict[str, Any]:
        """The ``registry`` section of the subscriber's status."""
        state = self.state
        applied = self.applied
        return {
            "seq": state.seq if state is not None else None,
            "aliases": dict(state.aliases) if state is not None else {},
            "pin": state.pin if state is not None else None,
            "change": state.change if state is not None else None,
            "offset": applied.offset if applied is not None else None,
            "ready": self.ready,
            "stale_records": self.stale,
            "search": self.scan.stats() if self.scan is not None else None,
        }
