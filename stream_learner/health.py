"""Whether each role of this process is making progress: what ``/health`` answers.

A joiner or a trainer is healthy while it makes progress: within
``health_stall_s`` its consumer read records, or had nothing to read while
connected to the brokers. It is unhealthy when it cannot: a dependency down
past that bound (the role's loop is stuck in a retry, so it stops reporting,
or its consumer has lost every broker connection), or a consumer stuck with
records unread that it does not read. A serving node is healthy while it has
a model to serve (see :func:`stream_learner.serving.node.run_node`).

A role reports once per cycle of its loop (:meth:`RoleProgress.observe`);
the verdict is computed when ``/health`` is asked, so a loop that stopped
reporting turns unhealthy by itself.

>>> clock = [0.0]
>>> health = Health(stall_s=60, clock=lambda: clock[0])
>>> health.expect("trainer")
>>> health.status()[0]  # started, no cycle done yet
False
>>> role = health.role("trainer")
>>> role.beat("caught up")
>>> clock[0] = 59.0; health.status()[0]
True
>>> clock[0] = 61.0; health.status()[1]["roles"]["trainer"]["detail"]
'no progress for 61 s (last: caught up)'
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

#: A named check: (healthy, what it says).
Check = Callable[[], tuple[bool, str]]


def consumer_lag(consumer: Any) -> tuple[int, int]:
    """(records unread, sum of positions) over a :class:`~stream_learner.bus.Consumer`'s assigned partitions.

    Uses only what the consumer already knows (the last fetch's high
    watermarks, its positions): no request to the broker.
    """
    from .bus import KAFKA_ERRORS  # here: the bus imports the metrics, which import this module

    lag = positions = 0
    for tp in consumer.assignment():
        try:
            position = consumer.position(tp, timeout_ms=0)
        except KAFKA_ERRORS:
            continue  # not known yet (just assigned)
        if position is None:
            continue
        positions += position
        highwater = consumer.highwater(tp)
        if highwater is not None:
            lag += max(0, highwater - position)
    return lag, positions


def connected(consumer: Any) -> bool:
    """True when a :class:`~stream_learner.bus.Consumer` holds at least one live broker connection."""
    return bool(consumer.connected())


class RoleProgress:
    """The progress one role reports from its loop; see the module docstring."""

    def __init__(self, name: str, stall_s: float, clock: Callable[[], float]) -> None:
        self.name = name
        self.stall_s = stall_s
        self.clock = clock
        self.last_progress: float | None = None
        self.detail = "starting"
        self.unread: int | None = None
        self._positions: int | None = None

    def beat(self, detail: str = "ok") -> None:
        """The role made progress now."""
        self.last_progress = self.clock()
        self.detail = detail

    def observe(self, consumer: Any) -> int:
        """One cycle of the role's loop, done, with its consumer; return the records unread.

        Progress when the positions moved since the last cycle, or nothing is
        unread and the consumer is connected to a broker.
        """
        lag, positions = consumer_lag(consumer)
        moved = self._positions is not None and positions != self._positions
        self._positions, self.unread = positions, lag
        if moved:
            self.beat("reading")
        elif lag == 0 and connected(consumer):
            self.beat("caught up")
        else:
            self.detail = f"{lag} records unread, none read" if lag else "no connection to any broker"
        return lag

    def status(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, what ``/health`` shows of this role)."""
        now = self.clock()
        body: dict[str, Any] = {"unread_records": self.unread}
        if self.last_progress is None:
            return False, {**body, "detail": self.detail}
        ago = now - self.last_progress
        body["last_progress_s_ago"] = round(ago, 3)
        if ago > self.stall_s:
            return False, {**body, "detail": f"no progress for {ago:.0f} s (last: {self.detail})"}
        return True, {**body, "detail": self.detail}


class Health:
    """The roles of one process and their verdicts; ``/health`` on the metrics port shows :meth:`status`."""

    def __init__(self, stall_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self.clock = clock
        self._roles: dict[str, RoleProgress] = {}
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()

    def expect(self, name: str) -> None:
        """Role ``name`` runs in this process: unhealthy ("starting") until it reports or adds its check."""
        with self._lock:
            if name not in self._roles:
                self._checks.setdefault(name, lambda: (False, "starting"))

    def role(self, name: str) -> RoleProgress:
        """The progress of role ``name`` (made on first use)."""
        with self._lock:
            if name not in self._roles:
                self._checks.pop(name, None)  # the placeholder of expect()
                self._roles[name] = RoleProgress(name, self.stall_s, self.clock)
            return self._roles[name]

    def add_check(self, name: str, check: Check) -> None:
        """Add a check computed on every ``/health`` (a serving node: is there a model to serve)."""
        with self._lock:
            self._checks[name] = check

    def status(self) -> tuple[bool, dict[str, Any]]:
        """(every role healthy, the JSON body of ``/health``)."""
        with self._lock:
            roles = dict(self._roles)
            checks = dict(self._checks)
        parts: dict[str, dict[str, Any]] = {}
        for name, role in roles.items():
            ok, body = role.status()
            parts[name] = {"healthy": ok, **body}
        for name, check in checks.items():
            ok, detail = check()
            parts[name] = {"healthy": ok, "detail": detail}
        healthy = all(p["healthy"] for p in parts.values())
        return healthy, {"status": "ok" if healthy else "unhealthy", "roles": parts}
