"""The join state in Redis: one atomic Lua call per poll.

:class:`RedisJoinStore` sends a whole poll's events to ``join.lua`` in one
``EVALSHA``: the round trips per poll are constant whatever the batch size.
The script's header documents the state machine; in short:

* a prediction waits ``window`` ms of event time for its label; a label may
  come first and wait for its prediction (``orphan_retention``);
* when the watermark passes a waiting prediction's deadline, an
  ``unlabeled`` example is emitted and the prediction is kept
  ``late_retention`` ms more, so that a ``late`` label can still join it;
* a label whose event time is past its prediction's deadline yields the
  same examples as if it had come after the window closed (``unlabeled``,
  then ``late``), so the examples depend on event times, not on arrival;
* an event already applied (same request, same role) has no effect;
* every call's emissions are kept in the outbox, as one entry under a token
  unique to the call, until the caller acknowledges the token; a later call
  may claim stale entries so a crashed joiner's emissions are emitted again.

Events are stored as they will be emitted: :func:`pack_prediction` and
:func:`pack_label` encode the decoded event and its source with msgpack
(about half the bytes of the JSON record), the script copies these bytes
into its emissions without looking inside, and the reply is one msgpack
array per outbox entry that :func:`decode_emissions` turns into typed
:class:`Emission` values in one C call.

A step can also be split in two, :meth:`RedisJoinStore.send` and
:meth:`RedisJoinStore.receive`, so that the caller works (produces the
previous step's examples) while Redis runs the script. ``WAITAOF`` is sent
right behind the ``EVALSHA``, on the same connection, so the reply of a
step that :meth:`~RedisJoinStore.receive` returns is already durable.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import msgspec
import redis
import structlog

from ..config import Settings
from ..events import ExampleKind, LabelEvent, PredictionEvent, Source

log = structlog.get_logger(__name__)


class StoredPrediction(msgspec.Struct, array_like=True, frozen=True):
    """A prediction as the join state keeps it: the decoded event and where it was read.

    ``state`` and ``time`` lead, at fixed offsets, for ``join.lua``: the
    state letter of the request (``w`` when packed; the script changes it in
    place) and the event time as a float (msgpack float64).
    """

    state: str
    time: float
    event: PredictionEvent
    source: Source | None


class StoredLabel(msgspec.Struct, array_like=True, frozen=True):
    """A label as the join state keeps it (state ``e``), like :class:`StoredPrediction`."""

    state: str
    time: float
    event: LabelEvent
    source: Source | None


class Emission(msgspec.Struct, array_like=True, frozen=True):
    """One example to emit: its kind and the stored events it is built from."""

    kind: ExampleKind
    prediction: StoredPrediction
    label: StoredLabel | None

    @property
    def request_id(self) -> str:
        return self.prediction.event.request_id


_pack = msgspec.msgpack.Encoder().encode
_emissions = msgspec.msgpack.Decoder(list[Emission])
_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])
_one_emission = msgspec.msgpack.Decoder(Emission)


_str32_header = struct.Struct(">BI").pack


def _lua_string(data: bytes) -> msgspec.Raw:
    """``data`` as a msgpack str: Redis's ``cmsgpack`` does not read msgpack's bin type."""
    return msgspec.Raw(_str32_header(0xDB, len(data)) + data)


def pack_prediction(event: PredictionEvent, source: Source | None) -> msgspec.Raw:
    """What the join state stores for a prediction, framed for :meth:`RedisJoinStore.send`."""
    return _lua_string(_pack(StoredPrediction("w", float(event.event_time), event, source)))


def pack_label(event: LabelEvent, source: Source | None) -> msgspec.Raw:
    """What the join state stores for a label, framed for :meth:`RedisJoinStore.send`."""
    return _lua_string(_pack(StoredLabel("e", float(event.event_time), event, source)))


def decode_emissions(blob: bytes) -> list[Emission]:
    """The emissions of one outbox entry (one msgpack array).

    An emission that does not decode (only a schema change between the
    joiner that stored an event and this one can cause it) is logged and
    skipped; the others are returned.
    """
    try:
        return _emissions.decode(blob)
    except msgspec.DecodeError:
        pass
    out = []
    for raw in _raw_list.decode(blob):
        try:
            out.append(_one_emission.decode(raw))
        except msgspec.DecodeError as exc:
            log.error("joiner_stored_payload_invalid", error=str(exc))
    return out


@dataclass(frozen=True)
class PartitionProgress:
    """What one input partition contributed to the watermark in this poll."""

    name: str
    max_event_time: int  # -1 when the poll held no valid event of it
    caught_up: bool


#: One input event for :meth:`RedisJoinStore.step`: type ``"P"`` or ``"L"``,
#: request id, event time, and what to store (:func:`pack_prediction`,
#: :func:`pack_label`).
JoinInput = tuple[str, str, int, msgspec.Raw]


@dataclass
class StepResult:
    """What one join step did.

    ``tokens`` are the outbox entries the caller now answers for: this
    step's own entry (when it emitted anything) and the entries it claimed.
    Acknowledge them (``acks`` of a later step) once the broker has every
    example of ``emissions``.
    """

    watermark: int
    duplicates: int
    orphans_dropped: int
    early_labels: int
    emissions: list[Emission] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    more_to_claim: bool = False


class JoinStore(Protocol):
    """The contract of a join state store (see the module docstring)."""

    def step(
        self,
        *,
        progress: list[PartitionProgress],
        acks: list[str],
        events: list[JoinInput],
        now_ms: int,
        claim_before_ms: int,
        total_partitions: int,
    ) -> StepResult:
        """Apply acks, progress and events atomically; return what to emit."""
        ...


class RedisJoinStore:
    """The join state in Redis (or Valkey), driven by ``join.lua``.

    The script runs on one connection that this store holds (taken from the
    client's pool on first use), so that ``WAITAOF`` covers exactly its
    calls; other reads use the client as usual.
    """

    SCRIPT = resources.files(__package__).joinpath("join.lua").read_text()
    SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._aof_wait = settings.joiner_wait_aof
        self._conn: Any = None
        # Outbox tokens: unique to this store object, then a counter.
        self._token_prefix = uuid.uuid4().hex[:16] + ":"
        self._seq = itertools.count(1)
        self._sent: tuple[list[bytes], str, bool] | None = None  # (args, token, WAITAOF sent)
        s = settings
        self._fixed = [s.joiner_window_ms, s.joiner_late_retention_ms, s.joiner_orphan_retention_ms,
                       s.joiner_state_ttl_ms, s.joiner_idle_timeout_ms, int(s.joiner_idle_advance),
                       s.joiner_max_expire_per_poll, s.joiner_allowed_lateness_ms]

    # -- one step -------------------------------------------------------------

    def step(
        self,
        *,
        progress: list[PartitionProgress],
        acks: list[str],
        events: list[JoinInput],
        now_ms: int,
        claim_before_ms: int = -1,
        total_partitions: int = 0,
        durable: bool = False,
    ) -> StepResult:
        """Run one join step (:meth:`send` then :meth:`receive`)."""
        self.send(progress=progress, acks=acks, events=events, now_ms=now_ms,
                  claim_before_ms=claim_before_ms, total_partitions=total_partitions, durable=durable)
        return self.receive()

    def send(
        self,
        *,
        progress: list[PartitionProgress],
        acks: list[str],
        events: list[JoinInput],
        now_ms: int,
        claim_before_ms: int = -1,
        total_partitions: int = 0,
        durable: bool = True,
    ) -> None:
        """Send one join step to Redis without waiting for it; :meth:`receive` returns its result.

        ``events`` are applied in order. ``progress`` covers the partitions
        this joiner owns; ``total_partitions`` counts those of all input
        topics, owned by anyone: the watermark does not move until each has
        reported. With ``durable``, a ``WAITAOF`` follows on the same
        connection, and :meth:`receive` returns only once Redis has fsynced
        the step. Every send uses a new outbox token, so a step sent again
        after a failure never overwrites the entry of a first try that ran.
        """
        token = f"{self._token_prefix}{next(self._seq)}"
        args = [
            "EVALSHA", self.SHA, 1, self.settings.joiner_redis_prefix, now_ms, *self._fixed,
            claim_before_ms, total_partitions, token, _pack(acks),
            _pack([(p.name, p.max_event_time, p.caught_up) for p in progress]), _pack(events),
        ]
        wait = durable and self._aof_wait
        if self._sent is not None:
            self._drop_connection()  # the reply of an earlier send was never read
            self._sent = None
        self._send(args, wait)
        self._sent = (args, token, wait)

    def receive(self) -> StepResult:
        """The result of the step :meth:`send` sent (durable if it asked so)."""
        if self._sent is None:
            raise RuntimeError("receive() without a step sent")
        args, token, wait = self._sent
        self._sent = None
        try:
            reply, aof = self._read(wait)
            if isinstance(reply, redis.exceptions.NoScriptError):
                # A restarted Redis lost its script cache: load it, send the step again.
                conn = self._conn
                conn.send_command("SCRIPT", "LOAD", self.SCRIPT)
                conn.read_response()
                self._send(args, wait)
                reply, aof = self._read(wait)
        except BaseException:
            self._drop_connection()
            raise
        if isinstance(aof, redis.ResponseError):
            log.info("joiner_waitaof_unavailable", error=str(aof))  # no AOF: waiting is moot
            self._aof_wait = False
        if isinstance(reply, Exception):
            raise reply
        result = StepResult(watermark=int(reply[0]), duplicates=int(reply[1]),
                            orphans_dropped=int(reply[2]), early_labels=int(reply[3]),
                            more_to_claim=bool(int(reply[4])))
        if reply[5]:
            result.emissions = decode_emissions(reply[5])
            result.tokens.append(token)
        for i in range(6, len(reply), 2):
            result.tokens.append(reply[i].decode())
            result.emissions += decode_emissions(reply[i + 1])
        return result

    def _send(self, args: list[Any], wait: bool) -> None:
        if self._conn is None:
            self._conn = self.client.connection_pool.get_connection()
        conn = self._conn
        commands = [args, ("WAITAOF", 1, 0, 0)] if wait else [args]
        try:
            # One write, so a health check cannot come between the two commands.
            conn.send_packed_command(conn.pack_commands(commands))
        except BaseException:
            self._drop_connection()
            raise

    def _read(self, wait: bool) -> tuple[Any, Any]:
        """Both replies of a sent step; a Redis error reply is returned, not raised."""
        replies = []
        for _ in range(2 if wait else 1):
            try:
                replies.append(self._conn.read_response(disable_decoding=True))
            except redis.ResponseError as exc:
                replies.append(exc)
        return replies[0], (replies[1] if wait else None)

    def _drop_connection(self) -> None:
        """Forget a connection whose replies are out of step (the next send reconnects)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self.client.connection_pool.release(conn)

    def close(self) -> None:
        """Give the script's connection back to the client's pool."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self.client.connection_pool.release(conn)

    # -- other operations -------------------------------------------------------

    def wait_durable(self) -> None:
        """Block until Redis has fsynced the steps sent so far to its append-only file (``WAITAOF``).

        Called before input offsets are committed, so a Redis crash cannot
        lose state whose inputs Kafka already considers consumed. A server
        without AOF (or without WAITAOF) turns the wait off, once.
        """
        if not self._aof_wait:
            return
        if self._sent is not None:
            self._drop_connection()  # the reply of an earlier send was never read
            self._sent = None
        if self._conn is None:
            self._conn = self.client.connection_pool.get_connection()
        try:
            self._conn.send_command("WAITAOF", 1, 0, 0)
            self._conn.read_response()
        except redis.ResponseError:
            self._aof_wait = False
        except BaseException:
            self._drop_connection()
            raise

    def watermark(self) -> int:
        """The current watermark (-1 before any)."""
        value = self.client.get(self.settings.joiner_redis_prefix + "wmv")
        return int(value) if value is not None else -1

    def pending_outbox(self) -> int:
        """Outbox entries (one per step that emitted) not yet acknowledged."""
        return int(self.client.zcard(self.settings.joiner_redis_prefix + "ob"))


def wall_ms() -> int:
    """Wall-clock milliseconds, the clock of TTLs, idleness and leases."""
    return time.time_ns() // 1_000_000
