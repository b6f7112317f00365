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
* every emission stays in an outbox until acknowledged; a later call may
  claim stale ones so a crashed joiner's emissions are emitted again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Protocol

import redis

from ..config import Settings

KIND_NAMES = {b"L": "labeled", b"U": "unlabeled", b"T": "late"}
KIND_LETTERS = {name: letter.decode() for letter, name in KIND_NAMES.items()}


@dataclass(frozen=True)
class Emission:
    """One example to emit: its kind and the stored payloads it is built from."""

    kind: str
    request_id: str
    prediction: bytes
    prediction_source: str
    label: bytes | None
    label_source: str | None

    @property
    def member(self) -> str:
        """The outbox member that acknowledges this emission."""
        return f"{KIND_LETTERS[self.kind]}|{self.request_id}"


@dataclass(frozen=True)
class PartitionProgress:
    """What one input partition contributed to the watermark in this poll."""

    name: str
    max_event_time: int  # -1 when the poll held no valid event of it
    caught_up: bool


@dataclass
class StepResult:
    """What one join step did."""

    watermark: int
    duplicates: int
    orphans_dropped: int
    early_labels: int
    emissions: list[Emission] = field(default_factory=list)


class JoinStore(Protocol):
    """The contract of a join state store (see the module docstring)."""

    def step(
        self,
        *,
        progress: list[PartitionProgress],
        acks: list[str],
        events: list[tuple[str, str, int, str, bytes]],
        now_ms: int,
        claim_before_ms: int,
        total_partitions: int,
    ) -> StepResult:
        """Apply acks, progress and events atomically; return what to emit."""
        ...


class RedisJoinStore:
    """The join state in Redis (or Valkey), driven by ``join.lua``."""

    SCRIPT = resources.files(__package__).joinpath("join.lua").read_text()

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._script = client.register_script(self.SCRIPT)
        self._aof_wait = settings.joiner_wait_aof

    def step(
        self,
        *,
        progress: list[PartitionProgress],
        acks: list[str],
        events: list[tuple[str, str, int, str, bytes]],
        now_ms: int,
        claim_before_ms: int = -1,
        total_partitions: int = 0,
    ) -> StepResult:
        """Run one join step; ``events`` are ``(type 'P'|'L', request id, event time, source, payload)``.

        ``progress`` covers the partitions this joiner owns; ``total_partitions``
        counts those of all input topics, owned by anyone: the watermark does
        not move until each has reported.
        """
        s = self.settings
        args: list[object] = [
            now_ms, s.joiner_window_ms, s.joiner_late_retention_ms, s.joiner_orphan_retention_ms,
            s.joiner_state_ttl_ms, s.joiner_idle_timeout_ms, int(s.joiner_idle_advance),
            s.joiner_max_expire_per_poll, s.joiner_allowed_lateness_ms, claim_before_ms, total_partitions,
            len(progress),
        ]
        for p in progress:
            args += (p.name, p.max_event_time, int(p.caught_up))
        args.append(len(acks))
        args += acks
        args.append(len(events))
        for event in events:
            args += event
        reply = self._script(keys=[s.joiner_redis_prefix], args=args)
        result = StepResult(watermark=int(reply[0]), duplicates=int(reply[1]),
                            orphans_dropped=int(reply[2]), early_labels=int(reply[3]))
        for i in range(5, 5 + 6 * int(reply[4]), 6):
            kind, req, p, ps, lab, ls = reply[i:i + 6]
            result.emissions.append(Emission(
                KIND_NAMES[kind], req.decode(), p, ps.decode(), lab or None, ls.decode() or None,
            ))
        return result

    def wait_durable(self) -> None:
        """Block until Redis has fsynced the step to its append-only file (``WAITAOF``).

        Called before input offsets are committed, so a Redis crash cannot
        lose state whose inputs Kafka already considers consumed. A server
        without AOF (or without WAITAOF) turns the wait off, once.
        """
        if not self._aof_wait:
            return
        try:
            self.client.execute_command("WAITAOF", 1, 0, 0)
        except redis.ResponseError:
            self._aof_wait = False

    def watermark(self) -> int:
        """The current watermark (-1 before any)."""
        value = self.client.get(self.settings.joiner_redis_prefix + "wmv")
        return int(value) if value is not None else -1

    def pending_outbox(self) -> int:
        """Emissions not yet acknowledged."""
        return int(self.client.zcard(self.settings.joiner_redis_prefix + "ob"))


def wall_ms() -> int:
    """Wall-clock milliseconds, the clock of TTLs, idleness and leases."""
    return time.time_ns() // 1_000_000
