"""Where a serving node starts: a verified, bounded, resumable backward scan of the model topic.

:class:`LatestScan` is the search a node starts from, where the end of the
topic may hold anything a writer without the key appended: it verifies
every manifest it meets, goes on past what it refuses, confirms a
candidate only once it has read back to its chunks (so a replayed old
manifest loses to the versions between), refuses versions below a floor,
and runs in bounded, resumable steps. :func:`newest_version` runs it to its
end for a trainer numbering its versions. It reads with the reader's
windows and checks (:mod:`.fetch`, :mod:`.verify`, :mod:`.assemble`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..bus import Consumer, TopicPartition
from .assemble import LoadLimits, load_weights
from .errors import CheckpointError, ReadTimeoutError, SignatureError
from .fetch import Overflow, RecordReader, Skipped, record_bytes, record_header
from .publish import H_MODEL, H_TYPE, TYPE_CHUNK, TYPE_MANIFEST
from .reader import LoadedCheckpoint
from .verify import Candidate, PublicKeys, key_list, verify_record


def newest_version(
    consumer: Consumer,
    topic: str,
    public_key: PublicKeys,
    model: str,
    *,
    timeout_s: float = 60.0,
    limits: ScanLimits | None = None,
) -> tuple[int, list[Refusal]]:
    """The highest *signed* version of ``model`` on the topic (0 if none), and what the scan refused.

    A :class:`LatestScan` run to its end: records a writer without the key
    appended (unsigned, forged or malformed manifests) are passed over and
    returned as refusals instead of raising, so they cannot stop a trainer
    numbering its versions; a signed manifest counts whatever became of its
    chunks, so no version number is ever used twice. Raises
    :class:`ReadTimeoutError` if the scan does not finish within ``timeout_s``.
    """
    scan = LatestScan(topic, public_key, model, limits=limits)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not tps:
        raise CheckpointError(f"topic {topic!r} does not exist or has no partitions")
    scan.start(consumer.beginning_offsets(tps), consumer.end_offsets(tps))
    deadline = time.monotonic() + timeout_s
    while scan.step(consumer, deadline_s=max(0.1, deadline - time.monotonic())) is None:
        if time.monotonic() > deadline:
            raise ReadTimeoutError(f"the scan of {topic!r} for {model!r} did not finish in {timeout_s:g} s")
    return scan.highest_verified or 0, scan.take_refusals()


@dataclass(frozen=True)
class ScanLimits:
    """Bounds of one :class:`LatestScan`: in all (``max_records``, ``max_bytes``), per
    :meth:`LatestScan.step` (``step_records``, ``step_s``), and the bytes one backward window
    holds (``window_bytes``, which also bounds the candidate's chunks kept for its load)."""

    max_records: int = 2_000_000
    max_bytes: int = 2 << 30
    step_records: int = 50_000
    step_s: float = 0.5
    window_bytes: int = 8 << 20


@dataclass
class Refusal:
    """A record the scan passed over: why (a failure reason), and where."""

    reason: str
    error: BaseException
    partition: int
    offset: int


@dataclass
class _PartitionScan:
    tp: TopicPartition
    cursor: int  # the next window ends here (exclusive)
    begin: int
    best: Candidate | None = None  # the newest verified manifest above the floor not yet confirmed
    confirm_at: int = 0  # best is confirmed once the cursor is at or below its first chunk's offset
    done: bool = False
    avg_bytes: float = 1024.0  # of the records read, to size the next window in records
    size: int = 1  # records in the next window: doubles, as read_latest's, up to the bytes allowed
    kept: dict[int, Any] = field(default_factory=dict)  # best's chunks read on the way, by offset
    kept_bytes: int = 0
    needed: set[int] = field(default_factory=set)  # best's chunk offsets


class LatestScan:
    """Find the newest *verified* checkpoint of ``model`` from the end of the topic, in bounded steps.

    Unlike :func:`read_latest` (the newest manifest record is authoritative),
    this is what a serving node starts from, where the end of the topic may
    hold anything a writer without the key appended:

    * every record whose headers say it is a manifest of ``model`` is
      decoded and its signature verified as the scan meets it; one that
      fails is a :class:`Refusal` (reason ``invalid``, ``signature``) and the
      scan goes on past it;
    * a verified manifest below ``floor`` (the highest good version the
      node knows) is refused as ``downgrade``;
    * a verified manifest is *confirmed* only once the scan has read back
      to its first chunk: any newer verified version met on the way wins.
      An old manifest replayed onto the end of the topic points at chunks
      far back, and every version published after it lies between: the
      scan meets them and the replay loses, without any state;
    * a partition is done when its candidate is confirmed, at its
      beginning, or (another partition being confirmed at record time
      ``T``) at a record older than ``T``; the scan is done when every
      partition is, or when ``limits.max_records`` or ``max_bytes`` are
      spent (an unconfirmed candidate is then refused as ``unconfirmed``,
      unless a floor above 0 vouches for it: it is at or above it);
    * :meth:`step` does at most ``step_records`` or ``step_s`` of it and
      returns: the caller follows the topic meanwhile, and a broker error
      loses nothing (the next step goes on from the same cursor, with
      whatever consumer the caller has by then);
    * a record larger than the consumer's receive limit is skipped (with a
      ``prober``, see :func:`probe`) and counted in ``skipped``.

    :meth:`step` returns the confirmed candidates in the order to try
    (newest version first) once the scan is done; :meth:`load` loads one.
    If it is then refused (its chunks, its weights), :meth:`resume` scans
    on below it.
    """

    def __init__(
        self, topic: str, public_keys: PublicKeys, model: str, *, floor: int = 0, limits: ScanLimits | None = None
    ) -> None:
        self.topic = topic
        self.keys = key_list(public_keys)
        self.model = model
        self._model_b = model.encode()
        self.floor = floor
        self.limits = limits or ScanLimits()
        self.records = 0
        self.bytes = 0
        self.skipped = Skipped()
        self.refusals: list[Refusal] = []  # since the caller last took them
        self.highest_verified: int | None = None  # the highest signed version met, whatever came of it
        self.exhausted = False
        self.other_models: set[str] = set()  # other models with a verified manifest met (see _note_other)
        # Called with every window read, (partition, records, lo, hi), before it is handled: a scan of
        # other records back from the same end (the registry's) uses the same read.
        self.observer: Callable[[TopicPartition, list[Any], int, int], None] | None = None
        self._tried: set[bytes] = set()
        self._parts: dict[TopicPartition, _PartitionScan] | None = None
        self._offsets: tuple[dict[TopicPartition, int], dict[TopicPartition, int]] | None = None

    # -- state ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once :meth:`start` has taken the topic's offsets."""
        return self._parts is not None

    @property
    def done(self) -> bool:
        """True when there is nothing left to scan."""
        return self._parts is not None and all(p.done for p in self._parts.values())

    def start(self, begin: Mapping[TopicPartition, int], end: Mapping[TopicPartition, int]) -> None:
        """Scan back from ``end`` (the offsets the caller follows from) to ``begin``."""
        self._offsets = (dict(begin), dict(end))
        self._parts = {
            tp: _PartitionScan(tp, end[tp], begin.get(tp, 0), done=end[tp] <= begin.get(tp, 0)) for tp in end
        }

    def stats(self) -> dict[str, Any]:
        """JSON-able progress: records and bytes read, partitions left, skipped records."""
        parts = self._parts or {}
        return {
            "records": self.records,
            "bytes": self.bytes,
            "done": self.done,
            "exhausted": self.exhausted,
            "partitions_left": sorted(p.tp.partition for p in parts.values() if not p.done),
            "skipped_records": self.skipped.count,
            "highest_verified": self.highest_verified,
        }

    def reached(self, partition: int) -> int | None:
        """The lowest offset the scan read back to in ``partition`` (None: not scanned)."""
        part = (self._parts or {}).get(TopicPartition(self.topic, partition))
        return part.cursor if part is not None else None

    def take_refusals(self) -> list[Refusal]:
        """The refusals since the last call (the caller counts and logs them)."""
        out, self.refusals = self.refusals, []
        return out

    # -- scanning ---------------------------------------------------------------

    def step(self, consumer: Any, *, prober: Any = None, deadline_s: float = 60.0) -> list[Candidate] | None:
        """Scan one bounded step; ``None`` while not done, else the confirmed candidates, best first."""
        if self._parts is None or self._offsets is None:
            raise RuntimeError("LatestScan.step before start")
        reader = RecordReader(
            consumer,
            self.topic,
            time.monotonic() + deadline_s,
            prober=prober,
            skipped=self.skipped,
            offsets=self._offsets,
        )
        limits = self.limits
        started, records_before = time.monotonic(), self.records
        while not self.done:
            if self.records >= limits.max_records or self.bytes >= limits.max_bytes:
                self._exhaust()
                break
            if self.records - records_before >= limits.step_records or time.monotonic() - started >= limits.step_s:
                return None
            for part in list(self._parts.values()):
                if not part.done:
                    self._window(reader, part)
        return self.candidates()

    def candidates(self) -> list[Candidate]:
        """The confirmed candidates, the newest version first."""
        found = [p.best for p in (self._parts or {}).values() if p.best is not None and p.done]
        return sorted(found, key=lambda c: (c.manifest.version, c.manifest.created_at), reverse=True)

    def load(
        self,
        consumer: Any,
        candidate: Candidate,
        *,
        limits: LoadLimits | None = None,
        prober: Any = None,
        timeout_s: float = 60.0,
    ) -> LoadedCheckpoint:
        """The weights of a confirmed candidate (chunks kept on the way, the rest fetched by offset)."""
        reader = RecordReader(
            consumer,
            self.topic,
            time.monotonic() + timeout_s,
            prober=prober,
            skipped=self.skipped,
            offsets=self._offsets,
        )
        tensors, metadata = load_weights(reader, candidate, limits)
        record = candidate.record
        return LoadedCheckpoint(
            manifest=candidate.manifest,
            tensors=tensors,
            metadata=metadata,
            topic=self.topic,
            partition=record.partition,
            offset=record.offset,
        )

    def resume(self, candidate: Candidate) -> None:
        """``candidate`` was refused at load: scan on below it in its partition."""
        assert self._parts is not None
        part = self._parts[TopicPartition(self.topic, candidate.record.partition)]
        if part.best is candidate:
            part.best, part.kept, part.kept_bytes, part.needed = None, {}, 0, set()
            part.done = part.cursor <= part.begin or self.exhausted

    def _note_other(self, record: Any) -> None:
        """Remember the name of another model with a verified manifest (bounded: one verification per
        name, :data:`MAX_OTHER_MODELS` names): what a node asked for a model the topic lacks says."""
        name = record_header(record, H_MODEL)
        if (
            name is None
            or record_header(record, H_TYPE) != TYPE_MANIFEST
            or name in self._tried
            or len(self._tried) >= 4 * MAX_OTHER_MODELS
            or len(self.other_models) >= MAX_OTHER_MODELS
        ):
            return
        self._tried.add(name)
        try:
            self.other_models.add(verify_record(self.topic, record, {}, self.keys).manifest.model)
        except Exception:  # noqa: BLE001 - a name only counts when a trusted key signed it
            return

    def _exhaust(self) -> None:
        assert self._parts is not None
        self.exhausted = True
        for part in self._parts.values():
            if not part.done and part.best is not None and self.floor > 0:
                part.done = True  # not confirmed, but at or above the floor: no downgrade in any case
                continue
            if not part.done and part.best is not None:
                best, part.best = part.best, None
                self.refusals.append(
                    Refusal(
                        "unconfirmed",
                        CheckpointError(
                            f"{self.model} v{best.manifest.version} at {self.topic}[{part.tp.partition}]@"
                            f"{best.record.offset}: the scan's budget ran out before its chunks "
                            f"(a replayed manifest hides newer versions behind it)"
                        ),
                        part.tp.partition,
                        best.record.offset,
                    )
                )
            part.done = True

    def _window(self, reader: RecordReader, part: _PartitionScan) -> None:
        """Read one window back from the cursor and handle its records, newest first."""
        size = max(1, min(part.size, MAX_SCAN_WINDOW, int(self.limits.window_bytes / max(part.avg_bytes, 1.0))))
        hi = part.cursor
        while True:
            lo = max(part.begin, hi - size)
            try:
                # Bounded in bytes as it is read: small records before may hide large ones here.
                records = reader.read_range(part.tp, lo, hi, max_bytes=None if size == 1 else self.limits.window_bytes)
                break
            except Overflow as over:
                size = max(1, (over.position - lo) // 2)  # read fewer, from the same end
        part.size = size * 2
        part.cursor = lo
        if self.observer is not None:
            self.observer(part.tp, records, lo, hi)
        if records:
            cost = sum(record_bytes(r) for r in records)
            self.records += len(records)
            self.bytes += cost
            part.avg_bytes = cost / len(records)
        else:
            self.records += hi - lo  # a gap (compaction, transactions): progress all the same
        window = {r.offset: r for r in records}
        bound = self._bound(part)
        # A partition done mid-window keeps its cursor just above the records it has not handled:
        # if its candidate is then refused at load, resume() goes on from there, so a version
        # between it and the window's end (a full one below a delta the node cannot apply) is met.
        for record in reversed(records):
            if bound is not None and record.timestamp < bound and part.best is None:
                part.done, part.cursor = True, record.offset + 1
                return
            if part.best is not None and record.offset < part.confirm_at:
                # Read back to its first chunk: confirmed; older records do not matter.
                part.done, part.cursor = True, record.offset + 1
                return
            self._record(part, record, window)
            if part.done:
                part.cursor = record.offset
                return
        if part.best is not None and part.cursor <= part.confirm_at:
            part.done = True
        elif part.cursor <= part.begin:
            part.done = True

    def _bound(self, part: _PartitionScan) -> int | None:
        assert self._parts is not None
        times = [
            p.best.record.timestamp for p in self._parts.values() if p is not part and p.done and p.best is not None
        ]
        return max(times) if times else None

    def _record(self, part: _PartitionScan, record: Any, window: dict[int, Any]) -> None:
        if record_header(record, H_MODEL) != self._model_b:
            self._note_other(record)
            return
        kind = record_header(record, H_TYPE)
        best = part.best
        if kind == TYPE_CHUNK:
            if best is not None and record.offset in part.needed:
                size = len(record.value or b"")
                if part.kept_bytes + size <= self.limits.window_bytes:
                    part.kept[record.offset] = record
                    part.kept_bytes += size
            return
        if kind != TYPE_MANIFEST:
            return
        try:
            candidate = verify_record(self.topic, record, {}, self.keys)
        except Exception as exc:  # noqa: BLE001 - every record is refused alike; the scan goes on
            reason = "signature" if isinstance(exc, SignatureError) else "invalid"
            self.refusals.append(Refusal(reason, exc, record.partition, record.offset))
            return
        manifest = candidate.manifest
        self.highest_verified = max(self.highest_verified or 0, manifest.version)
        if best is not None and manifest.version <= best.manifest.version:
            return  # history below a newer candidate found later in the log
        if manifest.version < self.floor:
            self.refusals.append(
                Refusal(
                    "downgrade",
                    CheckpointError(
                        f"{manifest.model} v{manifest.version} at {self.topic}[{record.partition}]@"
                        f"{record.offset} is below v{self.floor}, the highest good version this node knows"
                    ),
                    record.partition,
                    record.offset,
                )
            )
            return
        # A newer version: the candidate now, confirmed once the scan reaches its first chunk.
        offsets = manifest.weights.chunk_offsets
        part.best = Candidate(manifest, record, {})
        part.needed = set(offsets)
        part.kept = {o: window[o] for o in part.needed if o in window and o < record.offset}
        part.kept_bytes = sum(len(r.value or b"") for r in part.kept.values())
        part.best.window = part.kept
        part.confirm_at = min([o for o in offsets if o < record.offset], default=record.offset)
        if part.kept and part.kept_bytes > self.limits.window_bytes:
            part.kept, part.kept_bytes = {}, 0
            part.best.window = part.kept
        if part.cursor <= part.confirm_at:
            part.done = True


#: Names of other models the scan remembers, at most (a wrong model name is answered with them).
MAX_OTHER_MODELS = 32

#: Records in one backward window of the scan, at most (its bytes are bounded by ScanLimits.window_bytes).
MAX_SCAN_WINDOW = 8192
