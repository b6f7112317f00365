"""The join of an events replay: the live join script over the merged events, under a private key prefix.

The live joiner's rules, without its wall clock: a partition with nothing in
the range takes no part in the watermark (live, it would be idle: caught up
and silent); the others hold it until the range ends, never idle (nothing
of the range is ever "caught up" early). The watermark advances per join
step of ``replay_join_step_events`` merged events; step ``k`` runs at the
fixed clock ``1000 * (k + 1)``, so a replay's join does not depend on when
it runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from ..config import Settings
from ..errors import EventError
from ..events import LABEL, PREDICTION, Codec, ExampleEvent, Source
from ..join.examples import build_example
from ..join.records import pack_label, pack_prediction
from ..join.store import PartitionProgress, RedisJoinStore
from ..redis_conn import make_redis
from .merge import MergedReader

#: A merged event: (partition name, event time, (type, request id, event time, packed event)).
JoinEvent = tuple[str, int, Any]


class ReplayJoin:
    """Join steps in Redis for one replay (see the module docstring).

    ``decode`` is the merge reader's decoder; :meth:`steps` cuts the merged
    events into join steps; :meth:`send` then :meth:`receive` run one step
    (Redis works while the caller learns); ``dead_letters`` counts the
    refused events and ``seconds`` the time spent on the join.
    """

    def __init__(self, settings: Settings, prefix: str, parts: list[str]) -> None:
        s = settings
        self.settings = settings
        self.prefix = prefix
        self.parts = sorted(parts)
        self.client = make_redis(settings, prefix)
        join_settings = msgspec.structs.replace(
            s, joiner_redis_prefix=prefix, joiner_idle_advance=False, joiner_wait_aof=False
        )
        self.store = RedisJoinStore(self.client, join_settings)
        self.codecs: dict[str, tuple[Codec[Any], str, Callable[[Any, Source], msgspec.Raw]]] = {
            s.topic_predictions: (Codec(PREDICTION.event_type, s.max_event_bytes), "P", pack_prediction),
            s.topic_labels: (Codec(LABEL.event_type, s.max_event_bytes), "L", pack_label),
        }
        self.last_time: dict[tuple[str, int], int] = {}
        self.max_time = -1
        self.acks: list[str] = []
        self.dead_letters = 0
        self.seconds = 0.0

    def decode(self, record: Any) -> tuple[int, tuple[str, str, int, Any] | None]:
        """A record's merge time and join input (``None`` for a refused event, which keeps its place:
        next to its partition's previous event)."""
        codec, typ, pack = self.codecs[record.topic]
        try:
            event = codec.decode(record.value)
        except EventError:
            return self.last_time.get((record.topic, record.partition), -1), None
        t = self.last_time[(record.topic, record.partition)] = event.event_time
        return t, (typ, event.request_id, t, pack(event, Source(record.topic, record.partition, record.offset)))

    def steps(self, reader: MergedReader) -> Iterator[list[JoinEvent]]:
        """The merged events cut into join steps of ``replay_join_step_events`` (refused ones counted)."""
        size = self.settings.replay_join_step_events
        step: list[JoinEvent] = []
        for item in reader.read():
            if item[2] is None:
                self.dead_letters += 1
                continue
            step.append(item)
            if len(step) >= size:
                yield step
                step = []
        if step:
            yield step

    def send(self, events: list[JoinEvent], k: int) -> None:
        """Send join step ``k`` (its progress: each partition's largest event time in it)."""
        max_times: dict[str, int] = {}
        for name, _, ev in events:
            if ev[2] > max_times.get(name, -1):
                max_times[name] = ev[2]
        if max_times:
            self.max_time = max(self.max_time, max(max_times.values()))
        progress = [PartitionProgress(n, max_times.get(n, -1), False) for n in self.parts]
        began = time.perf_counter()
        self.store.send(
            progress=progress,
            acks=self.acks,
            events=[ev for _, _, ev in events],
            now_ms=1000 * (k + 1),
            claim_before_ms=-1,
            total_partitions=len(self.parts),
            durable=False,
        )
        self.seconds += time.perf_counter() - began

    def receive(self) -> list[ExampleEvent]:
        """The reply of the step :meth:`send` sent, as examples."""
        began = time.perf_counter()
        result = self.store.receive()
        # Nobody else reads this prefix, and a resumed replay rebuilds it: acknowledge at once.
        self.acks = result.tokens
        out = [build_example(e) for e in result.emissions]
        self.seconds += time.perf_counter() - began
        return out

    def close_windows(self, steps_done: int) -> list[ExampleEvent]:
        """Move the watermark past every deadline: open windows close as unlabeled."""
        s = self.settings
        out: list[ExampleEvent] = []
        beyond = self.max_time + s.joiner_window_ms + s.joiner_allowed_lateness_ms + 1
        for k in range(10_000):
            progress = [PartitionProgress(n, beyond, False) for n in self.parts]
            result = self.store.step(
                progress=progress,
                acks=self.acks,
                events=[],
                now_ms=1000 * (steps_done + k + 1),
                claim_before_ms=-1,
                total_partitions=len(self.parts),
            )
            self.acks = result.tokens
            if not result.emissions:
                break
            out += [build_example(e) for e in result.emissions]
        return out

    def delete_keys(self) -> None:
        """Delete every key under the replay's prefix."""
        batch: list[bytes] = []
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"  # the prefix, literally
        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.delete(*batch)
                batch = []
        if batch:
            self.client.delete(*batch)

    def close(self) -> None:
        """Release the Redis connections."""
        self.store.close()
        self.client.close()
