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

What is stored, and how it is packed, is in :mod:`stream_learner.join.records`.

A step can also be split, :meth:`RedisJoinStore.send` then
:meth:`RedisJoinStore.receive`, so that the caller works (produces the
previous step's examples) while Redis runs the script. ``WAITAOF`` goes
right behind the ``EVALSHA`` on the same connection, and its reply is read
by :meth:`RedisJoinStore.wait_durable`; the store alternates two
connections, so that reply can wait while the next step runs.
"""

from __future__ import annotations

import hashlib
import itertools
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgspec
import redis
import structlog

from ..config import Settings
from ..redis_conn import check_waitaof, waitaof
from .records import Emission, decode_emissions

log = structlog.get_logger(__name__)

_pack = msgspec.msgpack.Encoder().encode
_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])


@dataclass(frozen=True)
class PartitionProgress:
    """What one input partition contributed to the watermark in this poll.

    ``caught_up``: nothing of it is left unread (this process read to its
    end). ``read``: the poll held records of it, valid or not; a record
    restarts the wall-clock silence after which a caught-up partition is
    idle (``join.lua``, step 3).
    """

    name: str
    max_event_time: int  # -1 when the poll held no valid event of it
    caught_up: bool
    read: bool = False


#: One input event for :meth:`RedisJoinStore.step`: type ``"P"`` or ``"L"``,
#: request id, event time, and what to store (:func:`~stream_learner.join.records.pack_prediction`,
#: :func:`~stream_learner.join.records.pack_label`).
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


@dataclass
class _Sent:
    """A step on the wire: what was sent (to send it again), on which connection."""

    args: list[Any]
    token: str
    wait: bool
    conn: int


class RedisJoinStore:
    """The join state in Redis (or Valkey), driven by ``join.lua``.

    Steps run on two connections that this store holds (taken from the
    client's pool on first use), used in turn: a step's ``WAITAOF`` reply can
    then still be pending on one while the next step runs on the other.
    Other reads use the client as usual.
    """

    SCRIPT = resources.files(__package__).joinpath("join.lua").read_text()
    SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._aof_wait = settings.joiner_wait_aof
        self._replicas = settings.redis_wait_replicas
        self._conns: list[Any] = [None, None]
        # A received step's WAITAOF reply not read yet, per connection.
        self._unconfirmed = [False, False]
        # A WAITAOF reply was lost with its connection: wait_durable() must fail once.
        self._doubt = False
        self._next = 0
        # Outbox tokens: unique to this store object, then a counter.
        self._token_prefix = uuid.uuid4().hex[:16] + ":"
        self._seq = itertools.count(1)
        self._sent: _Sent | None = None
        s = settings
        self._fixed = [
            s.joiner_window_ms,
            s.joiner_late_retention_ms,
            s.joiner_orphan_retention_ms,
            s.joiner_state_ttl_ms,
            s.joiner_idle_timeout_ms,
            int(s.joiner_idle_advance),
            s.joiner_max_expire_per_poll,
            s.joiner_allowed_lateness_ms,
        ]

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
        again: bool = False,
    ) -> StepResult:
        """Run one join step (:meth:`send`, :meth:`receive`, and with ``durable`` :meth:`wait_durable`)."""
        self.send(
            progress=progress,
            acks=acks,
            events=events,
            now_ms=now_ms,
            claim_before_ms=claim_before_ms,
            total_partitions=total_partitions,
            durable=durable,
            again=again,
        )
        result = self.receive()
        if durable:
            self.wait_durable()
        return result

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
        again: bool = False,
    ) -> None:
        """Send one join step to Redis without waiting for it; :meth:`receive` returns its result.

        ``events`` are applied in order. ``progress`` covers the partitions
        this joiner owns; ``total_partitions`` counts those of all input
        topics, owned by anyone: the watermark does not move until each has
        reported. With ``durable``, a ``WAITAOF`` follows on the same
        connection; :meth:`wait_durable` reads its reply. Every send uses a
        new outbox token, so a step sent again after a failure never
        overwrites the entry of a first try that ran; such a step is sent
        with ``again``: it then writes even if it changes nothing, so its
        ``WAITAOF`` also covers the first try.
        """
        token = f"{self._token_prefix}{next(self._seq)}"
        args = [
            "EVALSHA",
            self.SHA,
            1,
            self.settings.joiner_redis_prefix,
            now_ms,
            *self._fixed,
            claim_before_ms,
            total_partitions,
            token,
            _pack(acks),
            _pack([(p.name, p.max_event_time, p.caught_up, p.read) for p in progress]),
            _pack(events),
            int(again),
        ]
        if self._sent is not None:
            self._drop(self._sent.conn)  # the reply of an earlier send was never read
        index = self._next
        self._next = 1 - index
        if self._unconfirmed[index]:
            self._confirm(index)  # normally read already (wait_durable); here it costs a wait
        sent = _Sent(args, token, durable and self._aof_wait, index)
        self._send(sent)
        self._sent = sent

    def receive(self) -> StepResult:
        """The result of the step :meth:`send` sent.

        A step sent as ``durable`` is durable once :meth:`wait_durable` has
        returned after this; until then its ``WAITAOF`` reply is pending.
        """
        sent, self._sent = self._sent, None
        if sent is None:
            raise redis.ConnectionError("no join step on the wire (its connection was dropped)")
        try:
            reply = self._read(sent)
            if isinstance(reply, redis.exceptions.NoScriptError):
                # A restarted Redis lost its script cache: load it, send the step again.
                conn = self._conns[sent.conn]
                conn.send_command("SCRIPT", "LOAD", self.SCRIPT)
                conn.read_response()
                self._send(sent)
                reply = self._read(sent)
        except BaseException:
            self._drop(sent.conn)
            raise
        if isinstance(reply, Exception):
            raise reply
        self._unconfirmed[sent.conn] = sent.wait
        result = StepResult(
            watermark=int(reply[0]),
            duplicates=int(reply[1]),
            orphans_dropped=int(reply[2]),
            early_labels=int(reply[3]),
            more_to_claim=bool(int(reply[4])),
        )
        if reply[5]:
            result.emissions = decode_emissions(reply[5])
            result.tokens.append(sent.token)
        for i in range(6, len(reply), 2):
            result.tokens.append(reply[i].decode())
            result.emissions += decode_emissions(reply[i + 1])
        return result

    def wait_durable(self) -> None:
        """Block until Redis has fsynced the steps received so far to its append-only file.

        Reads the pending ``WAITAOF`` replies. Called before input offsets
        are committed (and before their examples are produced), so a Redis
        crash cannot lose state whose inputs Kafka already considers
        consumed. If it raises, whether those steps are durable is unknown:
        the caller runs them again (with ``again``: they have no second effect
        if they ran, and the new try's ``WAITAOF`` covers the first).
        A server without AOF (or without ``WAITAOF``) turns the wait off, once.
        """
        doubt, self._doubt = self._doubt, False
        for index in (0, 1):
            if self._unconfirmed[index]:
                try:
                    self._confirm(index)
                finally:
                    self._doubt = False  # a failure here raises: that says it
        if doubt:
            raise redis.ConnectionError("a join step's WAITAOF reply was lost: its durability is unknown")

    def _confirm(self, index: int) -> None:
        try:
            check_waitaof(self._live(index).read_response(), self._replicas)
        except redis.ResponseError as exc:
            log.info("joiner_waitaof_unavailable", error=str(exc))  # no AOF: waiting is moot
            self._aof_wait = False
        except BaseException:
            self._drop(index)  # and _doubt is set
            raise
        self._unconfirmed[index] = False

    def _send(self, sent: _Sent) -> None:
        conn = self._conns[sent.conn]
        if conn is None:
            conn = self._conns[sent.conn] = self.client.connection_pool.get_connection()
        commands = [sent.args, waitaof(self._replicas)] if sent.wait else [sent.args]
        try:
            # One write, so a health check cannot come between the two commands.
            conn.send_packed_command(conn.pack_commands(commands))
        except BaseException:
            self._drop(sent.conn)
            raise

    def _read(self, sent: _Sent) -> Any:
        """The script's reply (a Redis error reply is returned, not raised)."""
        conn = self._live(sent.conn)
        try:
            return conn.read_response(disable_decoding=True)
        except redis.ResponseError as exc:
            if sent.wait:
                self._confirm_after_error(sent.conn)
            return exc

    def _confirm_after_error(self, index: int) -> None:
        """Read the WAITAOF reply behind a failed script call (it waited for nothing)."""
        try:
            self._live(index).read_response()  # gone if the failure was a MOVED (the client reconnects)
        except redis.ResponseError:
            pass

    def _live(self, index: int) -> Any:
        """The connection a reply is pending on; lost if something disconnected it meanwhile."""
        conn = self._conns[index]
        if conn is None or not conn.is_connected:
            raise redis.ConnectionError("the connection closed with a reply pending")
        return conn

    def _drop(self, index: int) -> None:
        """Forget a connection whose replies are out of step (the next send reconnects)."""
        conn, self._conns[index] = self._conns[index], None
        if self._unconfirmed[index]:
            self._unconfirmed[index] = False
            self._doubt = True
        if self._sent is not None and self._sent.conn == index:
            self._sent = None
        if conn is not None:
            conn.disconnect()
            self.client.connection_pool.release(conn)

    def close(self) -> None:
        """Give the connections back to the client's pool (a pending reply is dropped with them)."""
        for index in (0, 1):
            if self._conns[index] is not None:
                if self._unconfirmed[index] or (self._sent is not None and self._sent.conn == index):
                    self._drop(index)
                else:
                    conn, self._conns[index] = self._conns[index], None
                    self.client.connection_pool.release(conn)
        self._sent = None

    # -- other operations -------------------------------------------------------

    def watermark(self) -> int:
        """The current watermark, which closes windows (-1 before any)."""
        value = self.client.get(self.settings.joiner_redis_prefix + "wmv")
        return int(value) if value is not None else -1

    def event_watermark(self) -> int:
        """The watermark by event time alone, without idle advance, which collects state (-1 before any)."""
        value = self.client.get(self.settings.joiner_redis_prefix + "wme")
        return int(value) if value is not None else -1

    def pending_outbox(self) -> int:
        """Outbox entries (one per step that emitted) not yet acknowledged."""
        return int(self.client.zcard(self.settings.joiner_redis_prefix + "ob"))

    def pending_emissions(self) -> int:
        """Emissions in the outbox entries not yet acknowledged: what a restarted joiner emits first."""
        prefix = self.settings.joiner_redis_prefix
        total = 0
        tokens: list[bytes] = self.client.zrange(prefix + "ob", 0, -1)  # type: ignore[assignment]
        for token in tokens:
            blob: bytes | None = self.client.get(prefix + "ob:" + token.decode())  # type: ignore[assignment]
            total += len(_raw_list.decode(blob)) if blob else 0
        return total


def wall_ms() -> int:
    """Wall-clock milliseconds, the clock of TTLs, idleness and leases."""
    return time.time_ns() // 1_000_000
