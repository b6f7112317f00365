"""The model registry on the model topic: signed registry records (aliases, a fleet-wide pin).

A **registry record** holds the whole registry state of one model after one
change: its aliases (``champion``, ``challenger``, ``canary``, any name →
a version), the version pinned fleet-wide (or none), each alias's previous
versions (what ``rollback`` goes back to), and what the change was. The
newest valid record is the state; there is nothing to replay.

**Wire.** On the model topic, always in partition :data:`REGISTRY_PARTITION`
(0), keyed by the model name, value ``registry.v1`` JSON
(:class:`RegistryRecord`), headers ``sl-type: registry``, ``sl-model`` and
``sl-registry-seq``. Readers look for registry records in partition 0 only,
so every node sees every change in one order. Headers are not signed: a
reader checks them against the record.

**Signed** with the trainer's private key, by the manifests' mechanism
(:func:`~stream_learner.checkpoint.signing.signed_bytes`: the record without
its signature, validated, keys sorted). A record that is unsigned, signed
by an untrusted key or does not verify is refused and counted like a forged
manifest (``signature``; ``invalid`` if it does not decode); it never
changes what is served.

**Ordered.** ``seq`` counts the changes of a model's registry from 1; a
writer reads the newest state and writes ``seq + 1``. A reader following
the topic applies only a record whose ``seq`` is above the one it applied
(a replayed old record, validly signed, is ignored and counted); of two
records with the same ``seq`` (two writers at once) the first in the log
wins, and the second writer is told so. A serving node remembers the record
it applied (:class:`~stream_learner.serving.state.RegistryStore`) and refuses
a lower ``seq`` at start (``downgrade``), like the manifest floor.

**Found at start** by :class:`RegistryScan`, backwards from the end of
partition 0 in bounded steps, like the manifest scan: a record is
*confirmed* once the scan has read back to its ``log_end``, the end offset
of partition 0 its writer read before writing it. A genuine record's
``log_end`` is just below it; an old record replayed onto the end of the
topic keeps its old ``log_end``, so confirming it means reading back past
every record written since, and the newer ones win.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..bus import KAFKA_ERRORS, Consumer, Producer, TopicPartition
from ..errors import EventError
from ..events import REGISTRY, REGISTRY_HISTORY_MAX, RegistryRecord, encode, now_ms
from .errors import CheckpointError, SignatureError
from .fetch import Overflow, RecordReader, Skipped, record_bytes, record_header
from .publish import H_MODEL, H_TYPE
from .scan import ScanLimits
from .signing import sign_record, signed_bytes, verify_signature
from .verify import PublicKeys, key_list

#: Previous versions kept per alias (what successive rollbacks go back through).
HISTORY_MAX = REGISTRY_HISTORY_MAX

log = structlog.get_logger(__name__)

__all__ = [
    "H_SEQ",
    "REGISTRY_PARTITION",
    "TYPE_REGISTRY",
    "RegistryConflictError",
    "RegistryRecord",
    "RegistryScan",
    "registry_headers",
    "sign_registry",
    "verify_registry",
    "verify_registry_record",
]

H_SEQ = "sl-registry-seq"
TYPE_REGISTRY = b"registry"
#: Registry records are written to, and read from, this partition of the model topic alone.
REGISTRY_PARTITION = 0
#: A registry record larger than this is refused unread (a real one is a few hundred bytes).
MAX_RECORD_BYTES = 64 * 1024

_decoder = msgspec.json.Decoder(RegistryRecord)


def _message(record: RegistryRecord) -> bytes:
    return signed_bytes(record, _decoder, "registry.v1")


def sign_registry(record: RegistryRecord, private_key: Ed25519PrivateKey) -> RegistryRecord:
    """``record`` signed with the trainer's key (any previous signature replaced).

    >>> from stream_learner.checkpoint.signing import generate_keypair, load_private_key, load_public_key
    >>> private_pem, public_pem = generate_keypair()
    >>> signed = sign_registry(RegistryRecord(model="m", seq=1, log_end=0, created_at=0,
    ...                                       aliases={"champion": 3}), load_private_key(private_pem))
    >>> verify_registry(signed, load_public_key(public_pem))
    >>> verify_registry(msgspec.structs.replace(signed, aliases={"champion": 2}), load_public_key(public_pem))
    Traceback (most recent call last):
    ...
    stream_learner.checkpoint.errors.SignatureError: registry record m seq 1: signature does not verify with key ...
    """
    return sign_record(record, _message(record), _decoder, private_key)


def verify_registry(record: RegistryRecord, public_key: Ed25519PublicKey | Iterable[Ed25519PublicKey]) -> None:
    """Check that a trusted key signed exactly this record, or raise :class:`SignatureError`."""
    verify_signature(
        f"registry record {record.model} seq {record.seq}", record.signature, lambda: _message(record), public_key
    )


def registry_headers(record: RegistryRecord) -> list[tuple[str, bytes]]:
    """The headers a registry record is produced with."""
    return [(H_TYPE, TYPE_REGISTRY), (H_MODEL, record.model.encode()), (H_SEQ, str(record.seq).encode())]


def is_registry_record(record: Any, model_b: bytes | None = None) -> bool:
    """True if the headers of a consumed record say it is a registry record (of ``model_b`` if given)."""
    return record_header(record, H_TYPE) == TYPE_REGISTRY and (
        model_b is None or record_header(record, H_MODEL) == model_b
    )


def verify_registry_record(topic: str, record: Any, keys: PublicKeys) -> RegistryRecord:
    """The verified registry record in a consumed record, or :class:`CheckpointError` (``SignatureError``).

    Refused: a record outside partition 0, larger than :data:`MAX_RECORD_BYTES`,
    that does not decode as ``registry.v1``, is not signed by a trusted key,
    whose headers disagree with it, or whose ``log_end`` is past its own offset.
    """
    where = f"{topic}[{record.partition}]@{record.offset}"
    if record.partition != REGISTRY_PARTITION:
        raise CheckpointError(f"registry record at {where}: registry records live in partition {REGISTRY_PARTITION}")
    value = record.value or b""
    if len(value) > MAX_RECORD_BYTES:
        raise CheckpointError(f"registry record at {where} is {len(value)} bytes, at most {MAX_RECORD_BYTES}")
    try:
        decoded = REGISTRY.decode(value)
    except EventError as exc:
        raise CheckpointError(f"registry record at {where} is invalid: {exc}") from None
    verify_registry(decoded, key_list(keys))
    if (record_header(record, H_MODEL), record_header(record, H_SEQ)) != (
        decoded.model.encode(),
        str(decoded.seq).encode(),
    ):
        raise CheckpointError(f"registry record at {where} is {decoded.model} seq {decoded.seq}, its headers disagree")
    if decoded.log_end > record.offset:
        raise CheckpointError(f"registry record at {where} says it was written after offset {decoded.log_end}")
    return decoded


@dataclass(frozen=True)
class Found:
    """A verified registry record and where it is (partition 0)."""

    record: RegistryRecord
    offset: int


@dataclass
class RegistryRefusal:
    """A registry record the scan or a follower refused: why (a failure reason) and where."""

    reason: str
    error: BaseException
    offset: int


def refusal_reason(exc: BaseException) -> str:
    """``signature`` for a signature that fails, else ``invalid`` (the manifests' reasons)."""
    return "signature" if isinstance(exc, SignatureError) else "invalid"


@dataclass
class RegistryScan:
    """Find the newest valid registry record of ``model`` from the end of partition 0, in bounded steps.

    ``floor`` is the record a node applied before (``None``: none): a lower
    ``seq`` is refused (``downgrade``), and it vouches for a candidate the
    budget ran out before confirming. ``stop`` is where that node had
    searched to: nothing before it can be newer than ``floor``. The result
    (:attr:`found`) is the confirmed candidate, else ``floor``.
    """

    topic: str
    keys: list[Ed25519PublicKey]
    model: str
    floor: Found | None = None
    stop: int = 0
    limits: ScanLimits = field(default_factory=ScanLimits)
    records: int = 0
    bytes: int = 0
    exhausted: bool = False
    done: bool = False
    refusals: list[RegistryRefusal] = field(default_factory=list)
    skipped: Skipped = field(default_factory=Skipped)  # records too large to receive (shared with the manifest scan)
    _best: Found | None = None
    _cursor: int | None = None
    _begin: int = 0
    _end: int = 0
    _size: int = 1
    _avg_bytes: float = 1024.0

    @property
    def started(self) -> bool:
        """True once :meth:`start` has taken partition 0's offsets."""
        return self._cursor is not None

    @property
    def tp(self) -> TopicPartition:
        """Partition 0 of the model topic."""
        return TopicPartition(self.topic, REGISTRY_PARTITION)

    def start(self, begin: int, end: int) -> None:
        """Scan back from ``end`` (where the caller follows from) to ``begin`` (or :attr:`stop`)."""
        self._begin, self._end, self._cursor = begin, end, end
        self.done = end <= max(begin, self.stop)

    @property
    def reached(self) -> int:
        """The lowest offset read back to so far."""
        return self._cursor if self._cursor is not None else self._end

    @property
    def found(self) -> Found | None:
        """Once done: the newest valid record (a confirmed candidate, else the floor)."""
        best, floor = self._best, self.floor
        if best is not None and (floor is None or best.record.seq > floor.record.seq):
            return best
        return floor

    def stats(self) -> dict[str, Any]:
        """JSON-able progress."""
        return {
            "records": self.records,
            "bytes": self.bytes,
            "done": self.done,
            "exhausted": self.exhausted,
            "reached": self.reached,
        }

    def step(self, consumer: Any, *, prober: Any = None, deadline_s: float = 60.0) -> bool:
        """Scan one bounded step; True once done."""
        if self._cursor is None:
            raise RuntimeError("RegistryScan.step before start")
        tp = self.tp
        reader = RecordReader(
            consumer,
            self.topic,
            time.monotonic() + deadline_s,
            prober=prober,
            skipped=self.skipped,
            offsets=({tp: self._begin}, {tp: self._end}),
        )
        started, before = time.monotonic(), self.records
        limits = self.limits
        while not self.done:
            if self.records >= limits.max_records or self.bytes >= limits.max_bytes:
                self._exhaust()
                break
            if self.records - before >= limits.step_records or time.monotonic() - started >= limits.step_s:
                return False
            self._window(reader)
        return True

    def _window(self, reader: RecordReader) -> None:
        assert self._cursor is not None
        low = max(self._begin, self.stop)
        size = max(1, min(self._size, 8192, int(self.limits.window_bytes / max(self._avg_bytes, 1.0))))
        hi = self._cursor
        while True:
            lo = max(low, hi - size)
            try:
                records = reader.read_range(self.tp, lo, hi, max_bytes=None if size == 1 else self.limits.window_bytes)
                break
            except Overflow as over:
                size = max(1, (over.position - lo) // 2)
        self._size = size * 2
        self.observe(records, lo, hi)

    def observe(self, records: list[Any], lo: int, hi: int) -> None:
        """Handle the records of partition 0 in ``[lo, hi)``, read by this scan or by another one reading
        back from the same end (the manifest scan: one read serves both); ignored unless ``hi`` is
        where this scan is (a window it has not handled, right below what it has)."""
        if self.done or self._cursor is None or hi != self._cursor:
            return
        low = max(self._begin, self.stop)
        lo = max(lo, low)
        records = [r for r in records if lo <= r.offset < hi]
        self._cursor = lo
        if records:
            cost = sum(record_bytes(r) for r in records)
            self.records += len(records)
            self.bytes += cost
            self._avg_bytes = cost / len(records)
        else:
            self.records += hi - lo  # a gap: progress all the same
        model_b = self.model.encode()
        for record in reversed(records):
            if self._best is not None and record.offset < self._best.record.log_end:
                self.done = True  # read back to where its writer read the end: confirmed
                return
            if is_registry_record(record, model_b):
                self._consider(record)
        if (self._best is not None and self._cursor <= self._best.record.log_end) or self._cursor <= low:
            # Confirmed; or back at the beginning, or where this node searched to before (nothing
            # older can be newer than the record it applied then).
            self.done = True
        elif self.records >= self.limits.max_records or self.bytes >= self.limits.max_bytes:
            self._exhaust()

    def _consider(self, record: Any) -> None:
        try:
            found = Found(verify_registry_record(self.topic, record, self.keys), record.offset)
        except CheckpointError as exc:
            self.refusals.append(RegistryRefusal(refusal_reason(exc), exc, record.offset))
            return
        seq = found.record.seq
        if self.floor is not None and seq < self.floor.record.seq:
            self.refusals.append(
                RegistryRefusal(
                    "downgrade",
                    CheckpointError(
                        f"registry record {self.model} seq {seq} at offset {record.offset} is below seq "
                        f"{self.floor.record.seq}, the one this node applied"
                    ),
                    record.offset,
                )
            )
            return
        best = self._best
        # Reading backwards: a higher seq wins; of equal ones, the earlier in the log (what followers applied).
        if best is None or seq > best.record.seq or (seq == best.record.seq and record.offset < best.offset):
            self._best = found

    def _exhaust(self) -> None:
        self.exhausted = self.done = True
        best = self._best
        if best is None:
            return
        if self.floor is not None:
            return  # at or above the floor: the floor vouches for it
        self._best = None
        self.refusals.append(
            RegistryRefusal(
                "unconfirmed",
                CheckpointError(
                    f"registry record {self.model} seq {best.record.seq} at offset {best.offset}: the scan's budget "
                    f"ran out before offset {best.record.log_end}, where its writer read the end (a replayed "
                    f"record hides newer ones behind it)"
                ),
                best.offset,
            )
        )

    def take_refusals(self) -> list[RegistryRefusal]:
        """The refusals since the last call."""
        out, self.refusals = self.refusals, []
        return out


def scan_registry(
    consumer: Consumer, topic: str, keys: PublicKeys, model: str, *, limits: ScanLimits | None = None
) -> tuple[RegistryScan, int]:
    """The finished scan for ``model``'s registry state from the end of partition 0, and that end offset."""
    tp = TopicPartition(topic, REGISTRY_PARTITION)
    if not consumer.partitions_for_topic(topic):
        raise CheckpointError(f"topic {topic!r} does not exist or has no partitions")
    end = consumer.end_offsets([tp])[tp]
    begin = consumer.beginning_offsets([tp])[tp]
    scan = RegistryScan(topic, key_list(keys), model, limits=limits or ScanLimits())
    scan.start(begin, end)
    while not scan.step(consumer):
        pass
    return scan, end


class RegistryConflictError(CheckpointError):
    """Another writer changed the same model's registry at the same time, and its change came first."""


#: A change: the current state (``None``: none yet) -> (aliases, pin, history, what it did).
Change = Callable[[RegistryRecord | None], tuple[dict[str, int], int | None, dict[str, list[int]], str]]


def write_registry(
    consumer: Consumer,
    producer: Producer,
    topic: str,
    private_key: Ed25519PrivateKey,
    model: str,
    change: Change,
    *,
    limits: ScanLimits | None = None,
    timeout_s: float = 30.0,
) -> Found:
    """Read ``model``'s registry state, apply ``change`` and write the result as the next record; where it is.

    Raises :class:`RegistryConflictError` if a record of the same (or a
    higher) ``seq`` by another writer came first: this one changed nothing
    then (followers ignore it), and the change may be made again on the new
    state. ``change`` may raise to refuse (a version not on the topic, ...).
    """
    public = private_key.public_key()
    scan, end = scan_registry(consumer, topic, public, model, limits=limits)
    if scan.exhausted:
        raise CheckpointError(
            f"the registry of {model!r} cannot be read whole within the scan's bounds (serving_scan_max_records, "
            f"serving_scan_max_bytes: {scan.records} records, {scan.bytes} bytes read back): raise them"
        )
    current = scan.found.record if scan.found is not None else None
    aliases, pin, history, what = change(current)
    record = sign_registry(
        RegistryRecord(
            model=model,
            seq=(current.seq if current is not None else 0) + 1,
            log_end=end,
            created_at=now_ms(),
            aliases=aliases,
            pin=pin,
            history={a: versions[-HISTORY_MAX:] for a, versions in history.items() if versions},
            change=what,
        ),
        private_key,
    )
    try:
        meta = producer.send(
            topic,
            key=model.encode(),
            value=encode(record),
            headers=registry_headers(record),
            partition=REGISTRY_PARTITION,
        ).get(timeout=timeout_s)
    except KAFKA_ERRORS as exc:
        raise CheckpointError(f"registry record {model} seq {record.seq} not acknowledged: {exc}") from exc
    # Another writer may have read the same state: whatever lies between the end this writer read
    # and its own record decides which came first.
    tp = TopicPartition(topic, REGISTRY_PARTITION)
    reader = RecordReader(consumer, topic, time.monotonic() + timeout_s, offsets=({tp: end}, {tp: meta.offset + 1}))
    model_b = model.encode()
    for other in reader.read_range(tp, end, meta.offset):
        if not is_registry_record(other, model_b):
            continue
        try:
            first = verify_registry_record(topic, other, public)
        except CheckpointError:
            continue
        if first.seq >= record.seq:
            raise RegistryConflictError(
                f"another writer's registry record {model} seq {first.seq} ({first.change!r}, offset {other.offset}) "
                f"came first; this change (seq {record.seq}, offset {meta.offset}) is ignored by every node: "
                f"run it again on the new state"
            )
    log.info("registry_written", model=model, seq=record.seq, change=what, offset=meta.offset)
    return Found(record, meta.offset)
