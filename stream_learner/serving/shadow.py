"""Shadow traffic: a node answers with the champion and logs the challenger's prediction too (``serving_shadow``).

The trainer publishes its running challenger as the lineage
``<model>#challenger``, at the champion's version numbers
(:mod:`stream_learner.optimize.challenger`). A node started with
``serving_shadow = "challenger"`` follows that lineage with a second,
inner :class:`~stream_learner.serving.CheckpointSubscriber` (the same
verification, the same keep-last-good; no registry, no pin) and, for every
request the champion answered, predicts the same features with the
challenger and logs one structured line per instance::

    {"event": "shadow_prediction", "request_id": "r1", "model": "m",
     "champion_version": 12, "champion_prediction": {...},
     "challenger_version": 12, "challenger_prediction": {...}, "agree": true}

(``agree``: the two top classes are the same; ``null`` for regression) and
counts it in ``stream_learner_serving_shadow_predictions_total{outcome}``.

**The champion's path does not depend on the shadow.** A request enqueues
its rows (two attribute reads and a non-blocking put) and is answered; a
worker thread predicts with the challenger afterwards. A full queue drops
the shadow prediction (counted ``dropped``), a challenger that raises is
counted ``failed``; neither touches the answer. A shadow lineage absent,
refused (a bad signature) or not loaded yet means no shadow line, nothing
else. The worker gathers requests for up to :data:`LINGER_S` (at most
:data:`MAX_ROWS` rows) and predicts them in one call, since each call
holds the GIL the requests need (its answers may differ from one-row
predictions in float32 rounding, about 1e-7); a batch the challenger
refuses is retried request by request, so one bad request fails alone. It
still shares the process's CPU and GIL with the requests: no answer waits
for it, but requests are slower while it runs (``bench/bench_shadow.py``, 2
shared cores, sequential requests: p50 0.45 -> 0.59 ms, p99 0.69 -> 1.69 ms).

**Which challenger is shadowed.** The newest challenger loaded, while its
version is at least the champion's served version; otherwise none: the
trainer publishes a challenger of every version while one runs, so a
challenger older than the champion means it was promoted or dropped at a
drift (or that its version of the champion's newest one is still on its way,
a moment after the champion's). The next challenger the trainer starts is
shadowed as soon as it arrives. ``GET /model``'s ``shadow`` section and
``stream_learner_serving_shadow_version`` say what is shadowed and why not;
``shadow_started`` and ``shadow_stopped`` are logged at each change.
(A node pinned to an older champion keeps shadowing the newest challenger
it has, however old the champion it serves.)
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from ..checkpoint.verify import PublicKeys
from ..config import Settings
from ..metrics import Metrics
from .model import Answer, ServedModel
from .subscriber import CheckpointSubscriber
from .telemetry import LogLimiter

log = structlog.get_logger(__name__)

__all__ = ["LINGER_S", "MAX_ROWS", "QUEUE_BATCHES", "Shadow", "agreement"]

#: Request batches waiting for the shadow worker, at most (beyond: dropped, counted).
QUEUE_BATCHES = 1024
#: How long the worker gathers requests before predicting them in one call (seconds), and at most how many rows.
LINGER_S = 0.05
MAX_ROWS = 1024

ShadowRecord = dict[str, Any]
_Item = tuple[ServedModel, ServedModel, list[str], list[Mapping[str, Any]], list[Answer]]


def agreement(champion: Answer, challenger: Answer) -> bool | None:
    """Whether two predictions name the same top class (``None``: regression values, nothing to agree on).

    >>> agreement({"no": 0.7, "yes": 0.3}, {"no": 0.6, "yes": 0.4}), agreement({"no": 0.7, "yes": 0.3}, {"yes": 0.9})
    (True, False)
    >>> agreement(1.5, 1.4) is None
    True
    """
    if isinstance(champion, dict) and isinstance(challenger, dict):
        return max(champion, key=champion.__getitem__) == max(challenger, key=challenger.__getitem__)
    return None


class Shadow:
    """Follows ``<model>#<name>`` and predicts, off the request path, what the champion answered (module docstring).

    ``metrics``: the node's (the shadow families); the inner subscriber keeps
    its own registry, since the node's serving gauges describe the champion.
    ``on_record`` sees every record logged (a custom sink; tests).
    """

    def __init__(
        self,
        settings: Settings,
        public_keys: PublicKeys,
        *,
        model: str | None = None,
        name: str = "challenger",
        metrics: Metrics | None = None,
        queue_batches: int = QUEUE_BATCHES,
        linger_s: float = LINGER_S,
        max_rows: int = MAX_ROWS,
        on_record: Callable[[ShadowRecord], None] | None = None,
        poll_timeout_ms: int = 200,
    ) -> None:
        self.model = model or settings.serving_model or settings.trainer_model
        self.name = name
        self.lineage = f"{self.model}#{name}"
        self.metrics = metrics or Metrics(roles=["serving"])
        self.on_record = on_record
        self.linger_s = linger_s
        self.max_rows = max_rows
        self.subscriber = CheckpointSubscriber(
            settings,
            public_keys,
            model=self.lineage,
            variant="",
            alias="",
            registry=False,  # the registry names the champion's versions, not the challenger's
            metrics=Metrics(roles=["serving"]),
            poll_timeout_ms=poll_timeout_ms,
        )
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_batches)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # the counts and the last state reported
        self._last: int | None = None  # the challenger version shadowed at the last request (0: none)
        self._log_limiter = LogLimiter()
        self._thread = threading.Thread(target=self._work, name="serving-shadow", daemon=True)

    @classmethod
    def from_settings(
        cls, settings: Settings, public_keys: PublicKeys, *, metrics: Metrics | None = None
    ) -> Shadow | None:
        """The shadow ``serving_shadow`` asks for, or ``None`` when it is unset."""
        if not settings.serving_shadow:
            return None
        return cls(settings, public_keys, name=settings.serving_shadow, metrics=metrics)

    def start(self) -> Shadow:
        """Start following the lineage (in the background: a node never waits for its shadow) and the worker."""
        self.subscriber.start(wait_s=None)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (what is queued is predicted first, within ``timeout_s``) and the subscriber."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:
                pass  # the worker is stuck on a slow prediction: it is a daemon, let it go
            self._thread.join(timeout_s)
        self.subscriber.stop()

    # -- which challenger --------------------------------------------------------------------------

    def challenger(self, champion: ServedModel | None) -> ServedModel | None:
        """The challenger to shadow ``champion`` with now (``None``: none; see the module docstring)."""
        challenger = self.subscriber.current
        if challenger is None or champion is None or challenger.version < champion.version:
            return None
        return challenger

    def why_not(self, champion: ServedModel | None) -> str | None:
        """Why nothing is shadowed (``None``: a challenger is)."""
        challenger = self.subscriber.current
        if champion is None:
            return "no champion served"
        if challenger is None:
            problem = self.subscriber.problem
            return f"no {self.lineage} loaded" + (f": {problem}" if problem else "")
        if challenger.version < champion.version:
            return (
                f"the newest challenger is of v{challenger.version}, behind the champion v{champion.version}: "
                "the trainer publishes none now (promoted or dropped at a drift), or it is on its way"
            )
        return None

    def _report(self, champion: ServedModel | None, challenger: ServedModel | None) -> None:
        version = challenger.version if challenger is not None else 0
        with self._lock:
            changed, self._last = version != self._last, version
        if not changed:
            return
        self.metrics.serving_shadow_version.set(version)
        if challenger is not None:
            log.info("shadow_started", model=self.lineage, version=version)
        else:
            log.info("shadow_stopped", model=self.lineage, reason=self.why_not(champion))

    # -- the request path ----------------------------------------------------------------------------

    def observe(
        self,
        champion: ServedModel,
        request_ids: Sequence[str],
        features: Sequence[Mapping[str, Any]],
        predictions: Sequence[Answer],
    ) -> None:
        """What the champion answered, to be predicted by the challenger later. Never blocks, never raises."""
        try:
            challenger = self.challenger(champion)
            self._report(champion, challenger)
            if challenger is None:
                return
            self._queue.put_nowait((champion, challenger, list(request_ids), list(features), list(predictions)))
        except queue.Full:
            self._count("dropped", len(request_ids))
        except Exception:  # the shadow never fails a request
            if self._log_limiter.allow("observe") is not None:
                log.exception("shadow_observe_failed", model=self.lineage)

    # -- the worker ------------------------------------------------------------------------------------

    def _count(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self._counts[outcome] += n
        self.metrics.serving_shadow_predictions.labels(outcome=outcome).inc(n)

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, rows = [first], len(first[2])
            # Linger to predict many requests in one call: per row, one forward pass of a batch costs a
            # small share of one of its own, and each call holds the GIL the requests need.
            deadline = time.monotonic() + self.linger_s
            while rows < self.max_rows and (left := deadline - time.monotonic()) > 0:
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    stopping = True  # what was queued before the stop is still shadowed
                    break
                batch.append(item)
                rows += len(item[2])
            try:
                self._shadow(batch)
            except Exception:  # a sink that raises: logged, the worker goes on
                log.exception("shadow_record_failed", model=self.lineage)

    def _shadow(self, batch: list[_Item]) -> None:
        """Predict a batch of requests, one call per challenger, and log each instance."""
        for _, group in itertools.groupby(batch, key=lambda item: id(item[1])):
            items = list(group)
            challenger = items[0][1]
            rows = [row for item in items for row in item[3]]
            try:
                answers = challenger.predict(rows)
            except Exception as exc:  # noqa: BLE001 - the challenger's failure is counted, never the request's
                if len(items) > 1:  # one request's rows may be what it refuses: the others are shadowed
                    for item in items:
                        self._shadow([item])
                    continue
                self._failed(challenger, len(rows), exc)
                continue
            at = 0
            for champion, _, request_ids, _, predictions in items:
                for request_id, mine in zip(request_ids, predictions, strict=True):
                    self._record(champion, challenger, request_id, mine, answers[at])
                    at += 1

    def _failed(self, challenger: ServedModel, n: int, exc: BaseException) -> None:
        self._count("failed", n)
        suppressed = self._log_limiter.allow("predict")
        if suppressed is not None:
            log.warning(
                "shadow_failed",
                model=self.lineage,
                version=challenger.version,
                error=f"{type(exc).__name__}: {exc}",
                suppressed=suppressed,
            )

    def _record(
        self, champion: ServedModel, challenger: ServedModel, request_id: str, mine: Answer, theirs: Answer
    ) -> None:
        agree = agreement(mine, theirs)
        self._count("compared" if agree is None else "agree" if agree else "disagree")
        record: ShadowRecord = {
            "request_id": request_id,
            "model": champion.model,
            "champion_version": champion.version,
            "champion_prediction": mine,
            "challenger_version": challenger.version,
            "challenger_prediction": theirs,
            "agree": agree,
        }
        log.info("shadow_prediction", **record)
        if self.on_record is not None:
            self.on_record(record)
        # Release the GIL between two lines: measured, it shortens a waiting request's p99 (bench_shadow.py).
        time.sleep(0)

    def status(self, champion: ServedModel | None) -> dict[str, Any]:
        """The ``shadow`` section of ``GET /model``."""
        challenger = self.subscriber.current
        shadowed = self.challenger(champion)
        inner = self.subscriber.status()
        with self._lock:
            counts = dict(self._counts)
        return {
            "name": self.name,
            "lineage": self.lineage,
            "shadowing": shadowed is not None,
            "reason": self.why_not(champion),
            "challenger_version": challenger.version if challenger is not None else None,
            "champion_version": champion.version if champion is not None else None,
            "challenger_metrics": challenger.manifest.metrics if challenger is not None else None,
            "queued": self._queue.qsize(),
            "predictions": counts,
            "swaps": inner["swaps"],
            "failures": inner["failures"],
            "failures_by_reason": inner["failures_by_reason"],
            "last_error": inner["last_error"],
        }
