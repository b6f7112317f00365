"""Following a serving variant of a model (``serving_variant``, ``CheckpointSubscriber(variant=...)``).

A variant of model ``m`` is published as its own lineage ``m#<variant>``
(:mod:`stream_learner.optimize`): version ``v`` of it is derived from version
``v`` of ``m`` and published once it passed its gate, after ``v`` itself
(its held-out examples are the ones learned after ``v``). A subscriber asked
for a variant follows both lineages (the variant's with a second,
inner subscriber: the same checks, the same keep-last-good) and serves:

* the newest variant, while its parent version is at most
  ``serving_variant_max_lag`` versions behind the newest parent loaded (by
  default 1: the variant of the previous version serves while the newest
  version's variant is being gated);
* otherwise the newest parent: the **fallback**, when no variant of a recent
  version passed its gate (or none arrived yet). ``status()["variant"]``,
  ``GET /model`` and the ``stream_learner_serving_variant_*`` gauges say
  which is served and why.

A served variant answers under the parent's model name (what the prediction
events say, so the trainer learns from them), with the parent version it was
derived from as its version; its manifest (``served.manifest.variant``) says
what it is. While the parent is pinned, the pinned parent is served.

>>> from stream_learner.serving.model import ServedModel
>>> def parent(v): return ServedModel("m", v, None, None, 0.0)
>>> def variant(v): return ServedModel("m", v, None, None, 0.0)
>>> [c.version if c else None for c in (choose(parent(3), variant(2), 1)[0], choose(parent(4), variant(2), 1)[0])]
[2, 4]
>>> choose(parent(4), variant(2), 1)[1]
'the newest variant is of v2, 2 versions behind the parent v4 (serving_variant_max_lag=1)'
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from ..metrics import Metrics

if TYPE_CHECKING:
    from .model import ServedModel
    from .subscriber import CheckpointSubscriber

log = structlog.get_logger(__name__)

__all__ = ["VariantFollower", "choose"]


class Versioned(Protocol):
    """Anything with a version: a served model, or what the demo replays a node's choice with."""

    @property
    def version(self) -> int:
        """The (parent) version it is of."""
        ...


M = TypeVar("M", bound=Versioned)


def choose(parent: M | None, variant: M | None, max_lag: int) -> tuple[M | None, str]:
    """The model to serve of the newest parent and the newest variant, and why (empty: the variant)."""
    if variant is None:
        return parent, "no variant loaded yet" if parent is not None else "nothing loaded yet"
    if parent is None or parent.version - variant.version <= max_lag:
        return variant, ""
    return parent, (
        f"the newest variant is of v{variant.version}, {parent.version - variant.version} versions "
        f"behind the parent v{parent.version} (serving_variant_max_lag={max_lag})"
    )


class VariantFollower:
    """The inner subscriber of a variant lineage and the choice between it and the parent (module docstring)."""

    def __init__(self, outer: CheckpointSubscriber, variant: str, max_lag: int) -> None:
        from .subscriber import CheckpointSubscriber

        self.outer = outer
        self.variant = variant
        self.max_lag = max_lag
        self.lineage = f"{outer.model}#{variant}"
        self.served: ServedModel | None = None  # the newest variant, under the parent's name
        self._last: tuple[str, int] | None = None  # what was served at the last report: (kind, version)
        self._lock = threading.Lock()
        # Its own metrics registry: the node's serving gauges describe what it serves, set by the outer.
        self.inner = CheckpointSubscriber(
            outer.settings,
            outer.public_keys,
            model=self.lineage,
            variant="",
            alias="",
            registry=False,  # the registry names the parent's versions; the variant follows the parent's newest
            on_swap=self._swapped,
            metrics=Metrics(roles=["serving"]),
            poll_timeout_ms=outer.poll_timeout_ms,
            load_timeout_s=outer.load_timeout_s,
            window_bytes=outer.window_bytes,
            consumer_options=outer.consumer_options,
        )

    def current(self, parent: ServedModel | None) -> ServedModel | None:
        """What to serve now (two attribute reads: each a whole model)."""
        if self.outer._versions.pinned is not None or self.outer._versions.hold:
            return parent
        return choose(parent, self.served, self.max_lag)[0]

    def _swapped(self, new: ServedModel, old: ServedModel | None) -> None:
        before = self.current(self.outer._versions.current)
        self.served = dataclasses.replace(new, model=self.outer.model)
        self.report()
        after = self.current(self.outer._versions.current)
        if after is not None and after is not before and self.outer.on_swap is not None:
            try:
                self.outer.on_swap(after, before)
            except Exception:
                log.exception("on_swap_failed", model=self.outer.model, version=after.version)

    def report(self) -> None:
        """Set the gauges and log when what is served changes kind (a variant, or the parent)."""
        parent = self.outer._versions.current
        served, why = choose(parent, self.served, self.max_lag)
        if served is None:
            return
        is_variant = served is self.served and self.outer._versions.pinned is None
        metrics = self.outer.metrics
        metrics.serving_variant_fallback.set(0 if is_variant else 1)
        metrics.serving_variant_version.set(served.version if is_variant else 0)
        state = ("variant" if is_variant else "parent", served.version)
        with self._lock:
            changed, self._last = state != self._last, state
        if changed:
            if is_variant:
                log.info("variant_served", model=self.outer.model, variant=self.variant, version=served.version)
            else:
                log.warning(
                    "variant_fallback",
                    model=self.outer.model,
                    variant=self.variant,
                    version=served.version,
                    reason=why or "pinned",
                )

    def status(self, parent: ServedModel | None) -> dict[str, Any]:
        """The ``variant`` section of the subscriber's status."""
        served, why = choose(parent, self.served, self.max_lag)
        pinned = self.outer._versions.pinned is not None
        is_variant = served is not None and served is self.served and not pinned
        inner = self.inner.status()
        return {
            "name": self.variant,
            "lineage": self.lineage,
            "max_lag": self.max_lag,
            "serving": "variant" if is_variant else "parent",
            "fallback_reason": None if is_variant else (why or ("pinned" if pinned else None)),
            "variant_version": self.served.version if self.served is not None else None,
            "parent_version": parent.version if parent is not None else None,
            "recipe": self.served.manifest.variant.recipe
            if self.served is not None and self.served.manifest.variant is not None
            else None,
            "measured": self.served.manifest.variant.measured
            if self.served is not None and self.served.manifest.variant is not None
            else None,
            "swaps": inner["swaps"],
            "failures": inner["failures"],
            "failures_by_reason": inner["failures_by_reason"],
            "last_error": inner["last_error"],
        }
