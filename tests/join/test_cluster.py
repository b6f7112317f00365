"""The joiner and the trainer's state on a real three-node Valkey cluster, while the slot moves.

The roles are given the URL of a node that does *not* own their slot; the
joiner's slot is then resharded to another node (``SETSLOT``/``MIGRATE``,
as an operator would) while it works. The examples topic, deduplicated by
example id, must equal the offline oracle, and the trainer's state must
read back as saved. Two joiners in one consumer group (the scale-out
shape) must also lose nothing when the primary that owns their slot is
SIGKILLed mid-stream and started again from its append-only file.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import msgspec
import pytest
import torch

from stream_learner.checkpoint.state import Snapshot
from stream_learner.config import Settings
from stream_learner.events import ExampleEvent
from stream_learner.learn.build import state_store
from stream_learner.local import LocalValkeyCluster
from stream_learner.redis_conn import make_redis

from ..procs import read_topic
from .helpers import RunningJoiner, advance_all, oracle_joiner, wait_until
from .oracle import expected_examples, mismatches
from .test_crash import ExampleReader, produce_raw
from .test_redis_restart import TICK_TAG, W, generate, trickle


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalValkeyCluster]:
    with LocalValkeyCluster(3, tmp_path_factory.mktemp("cluster")) as c:
        yield c


def elsewhere(cluster: LocalValkeyCluster, key: str) -> str:
    """The URL of a node that does not own ``key``'s slot."""
    owner = cluster.owner(key)
    other = (owner + 1) % cluster.size
    return f"redis://127.0.0.1:{cluster.ports[other]}/0"


def test_a_prefix_without_a_hash_tag_is_refused_on_a_cluster() -> None:
    with pytest.raises(ValueError, match="hash tag"):
        Settings(redis_cluster=True, joiner_redis_prefix="sl:j:")
    with pytest.raises(ValueError, match="unix"):
        make_redis(Settings(redis_cluster=True, redis_url="unix:///tmp/x.sock"), "sl:{j}:")


@pytest.mark.slow
def test_the_joiner_on_a_cluster_loses_nothing_while_its_slot_moves(
    settings: Settings, cluster: LocalValkeyCluster
) -> None:
    prefix = "{" + settings.topic_predictions + "}:"
    s = oracle_joiner(
        settings, W, "cluster-joiner", redis_url=elsewhere(cluster, prefix), redis_cluster=True
    )  # the prefix is oracle_joiner's: the one slot
    stream = generate(6_000, 9_113)
    oracle = expected_examples(stream, W)
    half = len(stream) // 2
    produce_raw(s, stream[:half])
    reader = ExampleReader(s)
    moved_from = cluster.owner(prefix)
    with RunningJoiner(s) as joiner:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(reader.ids) < 300:
            reader.poll(100)
        assert reader.ids, "the joiner produced nothing on the cluster"
        second = threading.Thread(target=produce_raw, args=(s, stream[half:]), daemon=True)
        second.start()
        seen_at_move = len(reader.ids)
        cluster.move_slot(prefix, (moved_from + 2) % cluster.size)  # while the joiner works
        second.join(60)
        advance_all(s, max(ev.event_time for ev in stream) + 10 * W, partitions=s.partitions_input, tag=TICK_TAG)
        reader.read_until(oracle.examples.keys(), 90, linger_s=1)
    reader.drain()
    reader.close()
    examples: list[ExampleEvent] = [x for x in reader.records if not x.request_id.startswith(f"req-{TICK_TAG}-")]
    unique = {x.example_id: x for x in examples}
    retries = joiner.metrics.registry.get_sample_value("stream_learner_joiner_retries_total", {"dependency": "redis"})
    print(
        f"\ncluster: {len(oracle.examples)} expected, {seen_at_move} before the slot moved from node "
        f"{moved_from} to {cluster.owner(prefix)}; {len(examples)} on the topic; redis retries {retries}"
    )
    assert cluster.owner(prefix) != moved_from
    assert 0 < seen_at_move < len(oracle.examples), "the slot did not move mid-stream"
    problems = mismatches(examples, oracle)
    assert not problems, "\n".join(problems)
    assert Counter(x.kind for x in unique.values()) == oracle.counts()
    assert joiner.counts.dead_letters == 0


@pytest.mark.slow
def test_two_joiners_in_one_group_lose_nothing_when_their_primary_is_killed_and_restarted(
    settings: Settings, tmp_path
) -> None:
    """Two joiners share the input partitions and one slot; its primary (AOF, fsync every second,
    the joiners' ``WAITAOF``) is SIGKILLed while they work and restarted as the same node."""
    started = time.monotonic()
    assert settings.partitions_input >= 2, "two joiners need two input partitions or more to share"
    with LocalValkeyCluster(3, tmp_path / "cluster") as cluster:
        prefix = "{" + settings.topic_predictions + "}:"
        s = oracle_joiner(
            settings,
            W,
            "cluster-pair",
            redis_url=elsewhere(cluster, prefix),
            redis_cluster=True,
            consumer_session_timeout_ms=6000,
            consumer_max_poll_interval_ms=3000,
        )
        for i in range(cluster.size):  # the joiners' durability rests on these
            c = cluster.client(i)
            try:
                assert c.config_get("appendonly") == {"appendonly": "yes"}
                assert c.config_get("appendfsync")["appendfsync"] in ("everysec", "always")
            finally:
                c.close()
        stream = generate(20_000, 4_517)
        oracle = expected_examples(stream, W)
        half = len(stream) // 2
        produce_raw(s, stream[:half])
        reader = ExampleReader(s)
        owner = cluster.owner(prefix)
        owner_id = cluster.node_id(owner)
        producer = threading.Thread(target=trickle, args=(s, stream[half:]), daemon=True)
        with RunningJoiner(s) as a, RunningJoiner(s) as b:
            pair = (a, b)

            def both_working() -> bool:
                reader.poll(100)
                return all(sum(j.counts.events.values()) > 0 for j in pair)

            wait_until(both_working, 60, "both joiners to consume (one group, the partitions shared)")
            producer.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(reader.ids) < len(oracle.examples) // 4:
                reader.poll(100)
            seen_at_kill = len(reader.ids)
            consumed_at_kill = [sum(j.counts.events.values()) for j in pair]
            killed = time.monotonic()
            cluster.kill(owner)
            for _ in range(20):  # down ~2 s while both joiners keep trying
                reader.poll(100)
            cluster.restart(owner)  # same port, nodes.conf and AOF; returns at cluster_state:ok
            downtime = time.monotonic() - killed
            states = []
            for i in cluster.live():
                c = cluster.client(i)
                try:
                    states.append(c.execute_command("CLUSTER", "INFO").decode())
                finally:
                    c.close()
            producer.join(60)
            assert not producer.is_alive(), "producing the second half hung"
            advance_all(s, max(ev.event_time for ev in stream) + 10 * W, partitions=s.partitions_input, tag=TICK_TAG)
            reader.read_until(oracle.examples.keys(), 90, linger_s=1)
        reader.drain()
        reader.close()
        owner_after = cluster.owner(prefix)
        id_after = cluster.node_id(owner)

    examples: list[ExampleEvent] = [x for x in reader.records if not x.request_id.startswith(f"req-{TICK_TAG}-")]
    unique = {x.example_id: x for x in examples}
    retries = [
        j.metrics.registry.get_sample_value("stream_learner_joiner_retries_total", {"dependency": "redis"}) or 0
        for j in pair
    ]
    print(
        f"\ncluster pair: {len(stream)} input events, {len(oracle.examples)} expected {dict(oracle.counts())}; "
        f"{seen_at_kill} examples before node {owner} (the slot's primary) was SIGKILLed, the joiners had "
        f"consumed {consumed_at_kill}; down {downtime:.1f}s; topic held {len(examples)} "
        f"({len(examples) - len(unique)} duplicates); events consumed {[dict(j.counts.events) for j in pair]}; "
        f"redis retries {retries}; total {time.monotonic() - started:.1f}s"
    )
    assert all("cluster_state:ok" in info for info in states), states
    assert owner_after == owner and id_after == owner_id, "the restarted node is not the slot's owner it was"
    assert 0 < seen_at_kill < len(oracle.examples), "the primary was not killed mid-stream"
    assert all(n > 0 for n in consumed_at_kill), "both joiners were not working when the primary was killed"
    problems = mismatches(examples, oracle)
    assert not problems, "\n".join(problems)
    assert {(x.example_id, x.kind, x.request_id) for x in unique.values()} == oracle.keys()
    assert Counter(x.kind for x in unique.values()) == oracle.counts()
    assert sum(retries) > 0, "neither joiner retried Redis: the kill was not felt"
    assert all(j.counts.dead_letters == 0 for j in pair)
    assert read_topic(s, s.topic_dlq) == [], "dead letters were produced"


@pytest.mark.slow
def test_the_trainer_state_on_a_cluster_follows_its_slot(settings: Settings, cluster: LocalValkeyCluster) -> None:
    s = msgspec.structs.replace(settings, trainer_state_store="redis", trainer_model=f"m-{settings.topic_predictions}")
    key = f"sl:trainer:{s.trainer_model}:state"
    s = msgspec.structs.replace(s, redis_url=elsewhere(cluster, key), redis_cluster=True)
    store = state_store(s)
    first = Snapshot(tensors={"w": torch.arange(6.0)}, meta={"version": 1})
    store.save(first)
    assert cluster.client(cluster.owner(key)).exists(key) == 1  # on the owner, not the node named
    cluster.move_slot(key, (cluster.owner(key) + 1) % cluster.size)
    got = store.load()  # a MOVED reply, then the new owner
    assert got is not None and torch.equal(got.tensors["w"], first.tensors["w"]) and got.meta == first.meta
    store.save(Snapshot(tensors={"w": torch.ones(2)}, meta={"version": 2}))
    again = store.load()
    assert again is not None and again.meta == {"version": 2}


@pytest.mark.slow
def test_the_trainer_state_survives_a_failover_of_its_primary(settings: Settings, tmp_path) -> None:
    with LocalValkeyCluster(3, tmp_path) as cluster:
        s = msgspec.structs.replace(settings, trainer_state_store="redis", trainer_model="m-failover")
        key = f"sl:trainer:{s.trainer_model}:state"
        primary = cluster.owner(key)
        replica = cluster.add_replica(primary)
        s = msgspec.structs.replace(s, redis_url=elsewhere(cluster, key), redis_cluster=True)
        store = state_store(s)
        saved = Snapshot(tensors={"w": torch.arange(4.0)}, meta={"version": 7})
        store.save(saved)
        c = cluster.client(primary)
        try:
            c.execute_command("WAIT", 1, 5000)  # on the replica before the crash
        finally:
            c.close()
        cluster.kill(primary)
        got = store.load()  # refused connections, the slot map asked again, the promoted replica
        assert cluster.owner(key) == replica
        assert got is not None and torch.equal(got.tensors["w"], saved.tensors["w"]) and got.meta == saved.meta
