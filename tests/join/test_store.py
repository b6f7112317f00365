"""The Redis join store on its own, against the real local Valkey: state machine, outbox, bounds.

The main test drives :class:`RedisJoinStore` with seeded random streams cut
into random batches (predictions and labels of a request in one batch or
apart, early labels, late labels, predictions after their window closed,
duplicates, orphans) and checks every step against :class:`Reference`, a
plain-Python model of the documented semantics, one event at a time.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

import msgspec
import pytest
import redis

from stream_learner.config import Settings
from stream_learner.events import ExampleEvent, LabelEvent, PredictionEvent, Source, encode
from stream_learner.join.examples import build_example, encode_example, example_id
from stream_learner.join.records import pack_label, pack_prediction
from stream_learner.join.store import JoinInput, PartitionProgress, RedisJoinStore, StepResult
from stream_learner.local import LocalServers

T0 = 1_767_225_600_000
W = 100
LATE = 300
ORPHAN = 200
TTL = 10**9


@pytest.fixture
def store_settings(servers: LocalServers) -> Settings:
    return msgspec.structs.replace(
        servers.settings,
        joiner_window_ms=W,
        joiner_late_retention_ms=LATE,
        joiner_orphan_retention_ms=ORPHAN,
        joiner_state_ttl_ms=TTL,
        joiner_redis_prefix=f"{{st-{uuid.uuid4().hex[:8]}}}:",
        joiner_max_expire_per_poll=100_000,
    )


@pytest.fixture
def client(store_settings: Settings):
    c = redis.Redis.from_url(store_settings.redis_url)
    yield c
    c.close()


def pred(req: str, t: int, eid: str | None = None) -> PredictionEvent:
    return PredictionEvent(
        event_id=eid or f"p-{req}",
        request_id=req,
        model="m",
        model_version="1",
        event_time=t,
        features={"x": 1.5, "y": None},
        prediction={"a": 0.25, "b": 0.75},
    )


def lab(req: str, t: int, eid: str | None = None) -> LabelEvent:
    return LabelEvent(event_id=eid or f"l-{req}", request_id=req, event_time=t, label="a")


def inputs(events: list[PredictionEvent | LabelEvent], offset: int = 0) -> list[JoinInput]:
    out: list[JoinInput] = []
    for i, ev in enumerate(events):
        if isinstance(ev, PredictionEvent):
            out.append(("P", ev.request_id, ev.event_time, pack_prediction(ev, Source("preds", 0, offset + i))))
        else:
            out.append(("L", ev.request_id, ev.event_time, pack_label(ev, Source("labels", 0, offset + i))))
    return out


def step(
    store: RedisJoinStore,
    events: list[PredictionEvent | LabelEvent],
    *,
    watermark_time: int = -1,
    acks: list[str] | None = None,
    claim_before: int = -1,
    now: int = 10**12,
) -> StepResult:
    """One step; the single input partition reports ``watermark_time`` (or the batch's latest event time)."""
    top = max([ev.event_time for ev in events] + [watermark_time])
    return store.step(
        progress=[PartitionProgress("p:0", top, False)],
        acks=acks or [],
        events=inputs(events),
        now_ms=now,
        claim_before_ms=claim_before,
        total_partitions=1,
        durable=True,
    )


def kinds(result: StepResult) -> list[tuple[str, str, str | None]]:
    return [(e.kind, e.prediction.event_id, e.label.event_id if e.label else None) for e in result.emissions]


# -- the reference model ----------------------------------------------------------


@dataclass
class Reference:
    """The documented join semantics, one event at a time (the state machine in ``join.lua``'s header)."""

    window: int
    late: int
    orphan: int
    wm: int = -1
    top: int = -1
    st: dict[str, str] = field(default_factory=dict)
    pt: dict[str, int] = field(default_factory=dict)
    lt: dict[str, int] = field(default_factory=dict)
    p: dict[str, str] = field(default_factory=dict)
    lab: dict[str, str] = field(default_factory=dict)
    due: dict[str, int] = field(default_factory=dict)
    gc: dict[str, int] = field(default_factory=dict)

    def step(self, events: list[PredictionEvent | LabelEvent], watermark_time: int = -1) -> tuple[list, int, int, int]:
        out: list[tuple[str, str, str | None]] = []
        dup = early = orphans = 0
        for ev in events:
            r, t, s = ev.request_id, ev.event_time, self.st.get(ev.request_id)
            if isinstance(ev, PredictionEvent):
                deadline = t + self.window
                if s is None:
                    self.p[r], self.pt[r] = ev.event_id, t
                    if deadline < self.wm:
                        self.st[r] = "x"
                        self.gc[r] = deadline + self.late
                        out.append(("unlabeled", ev.event_id, None))
                    else:
                        self.st[r] = "w"
                        self.due[r] = deadline
                elif s == "e":
                    self.p[r], self.pt[r] = ev.event_id, t
                    self.gc[r] = deadline + self.late
                    if self.lt[r] <= deadline:
                        self.st[r] = "j"
                        out.append(("labeled", ev.event_id, self.lab[r]))
                    else:
                        self.st[r] = "t"
                        out += [("unlabeled", ev.event_id, None), ("late", ev.event_id, self.lab[r])]
                else:
                    dup += 1
            else:
                if s is None:
                    self.st[r], self.lab[r], self.lt[r] = "e", ev.event_id, t
                    self.gc[r] = t + self.orphan
                    early += 1
                elif s == "w":
                    self.lab[r] = ev.event_id
                    del self.due[r]
                    self.gc[r] = self.pt[r] + self.window + self.late
                    if t <= self.pt[r] + self.window:
                        self.st[r] = "j"
                        out.append(("labeled", self.p[r], ev.event_id))
                    else:
                        self.st[r] = "t"
                        out += [("unlabeled", self.p[r], None), ("late", self.p[r], ev.event_id)]
                elif s == "x":
                    self.st[r] = "t"
                    out.append(("late", self.p[r], ev.event_id))
                else:
                    dup += 1
        self.top = max([self.top, watermark_time] + [ev.event_time for ev in events])
        self.wm = max(self.wm, self.top)
        for r, deadline in sorted(self.due.items(), key=lambda kv: (kv[1], kv[0])):
            if deadline < self.wm:
                del self.due[r]
                if self.st[r] == "w":
                    self.st[r] = "x"
                    self.gc[r] = deadline + self.late
                    out.append(("unlabeled", self.p[r], None))
        for r, when in sorted(self.gc.items(), key=lambda kv: (kv[1], kv[0])):
            if when < self.wm:
                del self.gc[r]
                orphans += self.st.pop(r) == "e"
        return out, dup, early, orphans


def random_stream(rng: random.Random, n: int) -> list[PredictionEvent | LabelEvent]:
    """Requests in event-time order, with early, late, missing, duplicated and orphan labels."""
    timed: list[tuple[int, int, PredictionEvent | LabelEvent]] = []
    for i in range(n):
        req, t = f"r{i}", T0 + 3 * i
        timed.append((t, len(timed), pred(req, t)))
        r = rng.random()
        if r < 0.15:
            continue  # never labeled
        if r < 0.3:
            lt = t - rng.randint(0, 20)  # early
        elif r < 0.45:
            lt = t + W + rng.randint(1, LATE + 50)  # late, sometimes past the late retention
        elif r < 0.5:
            lt = t + W + rng.choice((0, 1))  # the window's edge
        else:
            lt = t + rng.randint(0, W)
        timed.append((lt, len(timed), lab(req, lt)))
    for j in range(n // 20):
        timed.append((T0 + rng.randint(0, 3 * n), len(timed), lab(f"o{j}", T0 + rng.randint(0, 3 * n))))
    timed.sort(key=lambda x: (x[0], x[1]))
    stream = [ev for _, _, ev in timed]
    # Some arrive out of order (a slow producer), some twice, some predictions re-sent with another id.
    for _ in range(n // 10):
        k = rng.randrange(len(stream) - 1)
        j = min(len(stream) - 1, k + rng.randint(1, 30))
        stream[k], stream[j] = stream[j], stream[k]
    for k in sorted(rng.sample(range(len(stream)), n // 15), reverse=True):
        ev = stream[k]
        again = ev if rng.random() < 0.7 or isinstance(ev, LabelEvent) else pred(ev.request_id, ev.event_time, "retry")
        stream.insert(min(len(stream), k + rng.randint(0, 40)), again)
    return stream


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_follow_the_reference_semantics(
    store_settings: Settings, client: redis.Redis, seed: int
) -> None:
    rng = random.Random(seed)
    store = RedisJoinStore(client, store_settings)
    ref = Reference(W, LATE, ORPHAN)
    stream = random_stream(rng, 1500)
    k = 0
    acks: list[str] = []
    totals = {"emissions": 0, "dup": 0, "early": 0, "orphans": 0}
    while k < len(stream):
        size = rng.choice((1, 2, 3, 10, 50, 200))
        batch = stream[k : k + size]
        k += size
        # Now and then the watermark jumps ahead of the batch (another partition reported).
        jump = ref.top + rng.randint(0, 400) if rng.random() < 0.1 else -1
        want, dup, early, orphans = ref.step(batch, jump)
        got = step(store, batch, watermark_time=jump, acks=acks)
        acks = got.tokens
        assert kinds(got) == want
        assert (got.duplicates, got.early_labels, got.orphans_dropped, got.watermark) == (dup, early, orphans, ref.wm)
        totals["emissions"] += len(want)
        totals["dup"] += dup
        totals["early"] += early
        totals["orphans"] += orphans
    # Close every window and collect everything: the state is empty but for the bookkeeping keys.
    final = ref.top + W + LATE + ORPHAN + 10
    want, _, _, orphans = ref.step([], final)
    got = step(store, [], watermark_time=final, acks=acks)
    assert kinds(got) == want and got.orphans_dropped == orphans
    step(store, [], watermark_time=final + 1, acks=got.tokens)
    p = store_settings.joiner_redis_prefix
    assert not ref.st and not list(client.scan_iter(f"{p}r:*"))
    assert client.zcard(p + "due") == client.zcard(p + "gc") == client.zcard(p + "ob") == 0
    assert not list(client.scan_iter(f"{p}ob:*"))
    # The streams exercise every path.
    assert min(totals.values()) > 0, totals


def test_examples_carry_the_stored_events_and_sources(store_settings: Settings, client: redis.Redis) -> None:
    store = RedisJoinStore(client, store_settings)
    p = msgspec.structs.replace(pred("a", T0), features={"x": 0.1, "y": None, "z": -3e-300}, prediction=12.5)
    label = LabelEvent(event_id="l-a", request_id="a", event_time=T0 + 5, label=2.0, model="m")
    first = step(store, [label])  # early: it waits in Redis
    assert first.emissions == [] and first.early_labels == 1
    got = store.step(
        progress=[PartitionProgress("p:0", T0, False)],
        acks=[],
        now_ms=10**12,
        events=inputs([p], offset=41),
        total_partitions=1,
    )
    [emission] = got.emissions
    x = build_example(emission)
    assert x == ExampleEvent(
        example_id=example_id("labeled", "p-a", "l-a"),
        kind="labeled",
        request_id="a",
        model="m",
        model_version="1",
        features=p.features,
        prediction=12.5,
        label=2.0,
        prediction_event_id="p-a",
        prediction_time=T0,
        prediction_source=Source("preds", 0, 41),
        label_event_id="l-a",
        label_time=T0 + 5,
        label_source=Source("labels", 0, 0),
    )
    # The record value the joiner sends is exactly the encoded example.
    assert encode_example(emission) == encode(x)
    late = step(store, [pred("u", T0), lab("u", T0 + W + 1)])
    assert [encode_example(e) for e in late.emissions] == [encode(build_example(e)) for e in late.emissions]
    assert [build_example(e).label for e in late.emissions] == [None, "a"]


def test_joined_state_keeps_no_payload_and_ttls_are_set_once(store_settings: Settings, client: redis.Redis) -> None:
    store = RedisJoinStore(client, store_settings)
    prefix = store_settings.joiner_redis_prefix
    step(store, [pred("w", T0), lab("e", T0)])
    assert TTL - 60_000 < client.pttl(f"{prefix}r:w") <= TTL
    assert TTL + ORPHAN - 60_000 < client.pttl(f"{prefix}r:e") <= TTL + ORPHAN
    step(store, [lab("w", T0 + 1), pred("e", T0 + 1), pred("both", T0 + 1), lab("both", T0 + 2)])
    for req in ("w", "e", "both"):
        assert client.strlen(f"{prefix}r:{req}") == 3  # joined: the state letter only
        assert 0 < client.pttl(f"{prefix}r:{req}") <= TTL + ORPHAN


@pytest.mark.slow
def test_outbox_entry_is_kept_until_acknowledged_and_can_be_claimed(
    store_settings: Settings, client: redis.Redis
) -> None:
    store = RedisJoinStore(client, store_settings)
    got = step(store, [pred("a", T0), lab("a", T0 + 1), pred("b", T0), lab("b", T0 + W + 1)], now=1000)
    assert kinds(got) == [("labeled", "p-a", "l-a"), ("unlabeled", "p-b", None), ("late", "p-b", "l-b")]
    assert len(got.tokens) == 1 and store.pending_outbox() == 1 and store.pending_emissions() == 3
    # Not acknowledged (the joiner died): a claim of entries leased before 2000 emits them again.
    again = step(store, [], now=3000, claim_before=2000)
    assert kinds(again) == kinds(got) and again.tokens == got.tokens
    # The claim renewed the lease: a claim of entries leased before 3000 does not take it again.
    assert step(store, [], now=3001, claim_before=3000).emissions == []
    step(store, [], now=3002, acks=again.tokens)
    assert store.pending_outbox() == 0
    assert not list(client.scan_iter(f"{store_settings.joiner_redis_prefix}ob:*"))


@pytest.mark.slow
def test_claims_come_a_few_entries_per_step(store_settings: Settings, client: redis.Redis) -> None:
    store = RedisJoinStore(client, store_settings)
    for i in range(20):
        step(store, [pred(f"r{i}", T0 + i), lab(f"r{i}", T0 + i)], now=1000 + i)
    claimed: list[str] = []
    while True:
        got = step(store, [], now=5000, claim_before=4000)
        claimed += got.tokens
        if not got.more_to_claim:
            break
    assert len(claimed) == len(set(claimed)) == 20
    step(store, [], now=5001, acks=claimed)
    assert store.pending_outbox() == 0


@pytest.mark.slow
def test_a_step_survives_a_script_cache_flush_and_a_lost_connection(
    store_settings: Settings, client: redis.Redis
) -> None:
    store = RedisJoinStore(client, store_settings)
    step(store, [pred("a", T0)])
    client.script_flush()
    assert kinds(step(store, [lab("a", T0 + 1)])) == [("labeled", "p-a", "l-a")]
    store.send(progress=[], acks=[], events=inputs([pred("b", T0)]), now_ms=10**12, total_partitions=1)
    # A reply never read (the caller failed in between): the next step starts on a fresh connection.
    got = step(store, [lab("b", T0 + 1)])
    assert kinds(got) == [("labeled", "p-b", "l-b")]
    store.close()


def test_a_lost_waitaof_reply_makes_the_step_run_again(store_settings: Settings, client: redis.Redis) -> None:
    store = RedisJoinStore(client, store_settings)
    events = [pred("a", T0), lab("a", T0 + 1)]
    store.send(
        progress=[PartitionProgress("p:0", T0 + 1, False)],
        acks=[],
        events=inputs(events),
        now_ms=1000,
        total_partitions=1,
    )
    first = store.receive()
    client.connection_pool.disconnect(inuse_connections=True)  # the WAITAOF reply is lost with it
    with pytest.raises(redis.ConnectionError):
        store.wait_durable()
    # Run again: no second effect on the state, and the first try's outbox entry is claimed.
    again = store.step(
        progress=[PartitionProgress("p:0", T0 + 1, False)],
        acks=[],
        events=inputs(events),
        now_ms=2000,
        claim_before_ms=1001,
        total_partitions=1,
        durable=True,
        again=True,
    )
    assert kinds(again) == kinds(first) == [("labeled", "p-a", "l-a")] and again.tokens == first.tokens
    assert again.duplicates == 2
    store.wait_durable()
    store.close()


# -- idleness: the rules of the README's table, one call at a time, on an injected clock -----------

IDLE = 3_000  # joiner_idle_timeout_ms
LAG = 3_600_000  # event times an hour behind the wall clock (a delayed producer, a backfill)
NOW = 2_000_000_000_000


@pytest.fixture
def idle_store(store_settings: Settings, client: redis.Redis) -> RedisJoinStore:
    return RedisJoinStore(
        client,
        msgspec.structs.replace(
            store_settings,
            joiner_idle_timeout_ms=IDLE,
            joiner_idle_advance=True,
            joiner_window_ms=10_000,
            joiner_late_retention_ms=20_000,
            joiner_orphan_retention_ms=20_000,
        ),
    )


def poll(
    store: RedisJoinStore,
    now: int,
    parts: dict[str, tuple[int, bool, bool]],
    events: list[PredictionEvent | LabelEvent] | None = None,
    total: int = 2,
) -> StepResult:
    """One call: ``parts`` maps a partition to (max event time or -1, caught up, read records)."""
    return store.step(
        progress=[PartitionProgress(n, t, c, r) for n, (t, c, r) in parts.items()],
        acks=[],
        events=inputs(events or []),
        now_ms=now,
        total_partitions=total,
    )


def silence(store: RedisJoinStore, start: int, end: int, names: tuple[str, ...] = ("a", "b")) -> StepResult:
    """A joiner polling every 500 ms from ``start`` to ``end``, its partitions caught up and silent."""
    got = None
    for now in [*range(start, end, 500), end]:
        got = poll(store, now, dict.fromkeys(names, (-1, True, False)))
    assert got is not None
    return got


def test_a_steady_trickle_is_never_idle_whatever_its_event_times(idle_store: RedisJoinStore) -> None:
    t = NOW - LAG
    for k in range(100):  # a record on both partitions every 200 ms of wall clock, each read to the end at once
        got = poll(idle_store, NOW + 200 * k, {"a": (t + 200 * k, True, True), "b": (t + 200 * k - 50, True, True)})
        assert got.watermark == t + 200 * k - 50  # the event times', never the wall clock's
    # Silent for the idle timeout: only then idle; the wall clock takes over from the event times.
    quiet = NOW + 200 * 99
    assert silence(idle_store, quiet + 500, quiet + IDLE - 1).watermark == t + 200 * 99 - 50
    later = silence(idle_store, quiet + IDLE, quiet + IDLE + 5_000).watermark
    # Each partition's event time runs on from its last event with the wall clock: an hour behind still.
    assert later == t + 200 * 99 - 50 + 5_000


def test_an_idle_partition_stops_holding_the_watermark_back_and_a_record_makes_it_active(
    idle_store: RedisJoinStore,
) -> None:
    t = NOW - LAG
    poll(idle_store, NOW, {"a": (t, True, True), "b": (t - 9_000, True, True)})
    # b stays caught up and silent; a keeps getting records.
    for k in range(1, 5):
        got = poll(idle_store, NOW + 1_000 * k, {"a": (t + 1_000 * k, True, True), "b": (-1, True, False)})
    assert got.watermark == t + 4_000  # b idle since NOW + IDLE: a alone decides
    # A record on b: active again at once, holding the watermark where it was (it never goes back).
    got = poll(idle_store, NOW + 5_000, {"a": (t + 5_000, True, True), "b": (t - 8_000, False, True)})
    assert got.watermark == t + 4_000
    assert (
        poll(idle_store, NOW + 6_000, {"a": (t + 6_000, True, True), "b": (t + 5_500, True, True)}).watermark
        == t + 5_500
    )


def test_a_partition_nobody_reports_is_active_a_restarted_joiner_expires_nothing(idle_store: RedisJoinStore) -> None:
    t = NOW - 10_000
    # Both caught up and silent long enough: idle; the wall clock moves the watermark.
    poll(idle_store, NOW, {"a": (t, True, True), "b": (t, True, True)}, [pred("w", t)])
    assert silence(idle_store, NOW + 500, NOW + IDLE + 1_000).watermark == t + 1_000
    # The joiner is down 12 s; its first call after the restart reports nothing yet (no assignment):
    # nobody watched the partitions, so they may hold unread labels, and they hold the watermark.
    for now in range(NOW + IDLE + 13_000, NOW + IDLE + 20_000, 500):
        got = poll(idle_store, now, {})
        assert got.watermark == t + 1_000 and got.emissions == []
    # Assigned again, reading the backlog (not caught up): the label waiting unread joins.
    got = poll(idle_store, NOW + IDLE + 20_000, {"a": (t + 5, False, True), "b": (-1, False, False)}, [lab("w", t + 5)])
    assert kinds(got) == [("labeled", "p-w", "l-w")]
    # Caught up again: the silence counts from now, not from before the outage.
    got = silence(idle_store, NOW + IDLE + 20_500, NOW + 2 * IDLE + 20_000)
    assert got.watermark == t + 1_000 and kinds(got) == []


def test_labels_of_predictions_idle_advance_expired_become_late_never_orphans(idle_store: RedisJoinStore) -> None:
    t = NOW - 100_000
    poll(idle_store, NOW, {"a": (t, True, True), "b": (t, True, True)}, [pred("x", t), lab("early", t)])
    # Silence: the wall clock runs the watermark far past the window, the late and the orphan retentions.
    closed = []
    for now in range(NOW + 500, NOW + IDLE + 60_001, 500):
        got = poll(idle_store, now, {"a": (-1, True, False), "b": (-1, True, False)})
        closed += kinds(got)
        assert got.orphans_dropped == 0
    assert got.watermark == t + 60_000 and closed == [("unlabeled", "p-x", None)]
    assert idle_store.event_watermark() == t
    # Traffic comes back with the events that were on their way: nothing was collected under them.
    got = poll(
        idle_store,
        NOW + IDLE + 60_500,
        {"a": (t + 30, False, True), "b": (t + 20, False, True)},
        [lab("x", t + 30), pred("early", t + 20)],
    )
    # (the early label's pair is judged by its event times, as always: within the window)
    assert kinds(got) == [("late", "p-x", "l-x"), ("labeled", "p-early", "l-early")]
    assert got.orphans_dropped == 0


def test_without_idle_advance_an_all_idle_input_keeps_the_watermark(
    store_settings: Settings, client: redis.Redis
) -> None:
    store = RedisJoinStore(
        client, msgspec.structs.replace(store_settings, joiner_idle_timeout_ms=IDLE, joiner_idle_advance=False)
    )
    t = NOW - LAG
    poll(store, NOW, {"a": (t, True, True), "b": (t, True, True)})
    assert poll(store, NOW + 10 * IDLE, {"a": (-1, True, False), "b": (-1, True, False)}).watermark == t
