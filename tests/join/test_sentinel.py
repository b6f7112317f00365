"""The roles on Redis Sentinel: a master, a replica and a Sentinel started by the test; the master dies.

The client is redis-py's own ``Sentinel.master_for`` (``redis_sentinel_master``):
after the Sentinel promotes the replica, the trainer's state store (retried as
a role retries) reads back what was saved before the crash and saves again,
and a joiner run across the failover with ``redis_wait_replicas = 1`` (each
step on the replica's AOF before it counts) loses nothing.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis
import torch

from stream_learner.checkpoint.state import Snapshot
from stream_learner.config import Settings
from stream_learner.learn.build import state_store
from stream_learner.local import _start_valkey, free_port, valkey_binary

from .helpers import RunningJoiner, advance_all, oracle_joiner
from .oracle import expected_examples, mismatches
from .test_crash import ExampleReader, produce_raw
from .test_redis_restart import TICK_TAG, W, generate

MASTER = "sl-master"


class Sentinel:
    """A master, two replicas and one Sentinel (quorum 1, down after 2 s) on free loopback ports.

    Two replicas, so that after a failover the new master has one again (``redis_wait_replicas = 1``
    waits for it)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = [free_port(), free_port(), free_port()]
        self.sentinel_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Sentinel:
        log = self.workdir / "valkey.log"
        master, *replicas = self.ports
        # No 5 s pause before a full resync: after a failover the new master's first replica
        # is what lets the joiner's WAITAOF succeed again.
        fast = ("--repl-diskless-sync-delay", "0")
        self.procs.append(_start_valkey(master, self.workdir / "m", log, 20, fast))
        for i, port in enumerate(replicas):
            follow = (*fast, "--replicaof", "127.0.0.1", str(master))
            self.procs.append(_start_valkey(port, self.workdir / f"r{i}", log, 20, follow))
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 2000\nsentinel failover-timeout {MASTER} 10000\n"
        )
        self.procs.append(
            subprocess.Popen(
                [valkey_binary(), str(conf), "--sentinel"],
                stdout=log.open("ab"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                links = [self.client(p).info("replication")["master_link_status"] for p in replicas]
                if self.master() == master and links == ["up"] * len(replicas):
                    return self
            except (redis.RedisError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError("the Sentinel and the replica did not come up")

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.sentinel_port}/0"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def master(self) -> int:
        """The master's port, as the Sentinel says."""
        _, port = self.client(self.sentinel_port).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def kill_master(self) -> int:
        """SIGKILL the master; wait until the Sentinel names the replica; its port."""
        old = self.master()
        self.procs[self.ports.index(old)].kill()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.master() != old:
                    return self.master()
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise AssertionError("the Sentinel did not fail over")


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Sentinel]:
    with Sentinel(tmp_path) as s:
        yield s


@pytest.mark.slow
def test_the_trainer_state_survives_a_sentinel_failover(settings: Settings, sentinel: Sentinel) -> None:
    s = msgspec.structs.replace(
        settings,
        redis_url=sentinel.url,
        redis_sentinel_master=MASTER,
        trainer_state_store="redis",
        redis_wait_replicas=1,
    )
    store = state_store(s)
    saved = Snapshot(tensors={"w": torch.arange(4.0)}, meta={"version": 7})
    store.save(saved)  # on the replica's AOF too before it returns
    promoted = sentinel.kill_master()
    got = store.load()  # the dead master refuses; asked again, the Sentinel names the promoted replica
    assert promoted in sentinel.ports[1:]
    assert got is not None and torch.equal(got.tensors["w"], saved.tensors["w"]) and got.meta == saved.meta
    store.save(Snapshot(tensors={"w": torch.ones(2)}, meta={"version": 8}))
    again = store.load()
    assert again is not None and again.meta == {"version": 8}


@pytest.mark.slow
def test_a_joiner_on_sentinel_loses_nothing_when_the_master_dies(settings: Settings, sentinel: Sentinel) -> None:
    s = oracle_joiner(
        settings,
        W,
        "sentinel-joiner",
        redis_url=sentinel.url,
        redis_sentinel_master=MASTER,
        redis_wait_replicas=1,  # acknowledged means on the replica's disk too: the failover loses nothing
    )
    stream = generate(6_000, 9_115)
    oracle = expected_examples(stream, W)
    half = len(stream) // 2
    produce_raw(s, stream[:half])
    reader = ExampleReader(s)
    with RunningJoiner(s) as joiner:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(reader.ids) < 300:
            reader.poll(100)
        assert reader.ids, "the joiner produced nothing through the Sentinel"
        second = threading.Thread(target=produce_raw, args=(s, stream[half:]), daemon=True)
        second.start()
        seen_at_kill = len(reader.ids)
        sentinel.kill_master()
        second.join(60)
        advance_all(s, max(ev.event_time for ev in stream) + 10 * W, partitions=s.partitions_input, tag=TICK_TAG)
        # The joiner waits, by design, until the new master has a replica whose AOF holds each
        # step; on a loaded machine the Sentinel can fail over a second time (a fresh link to the
        # promoted master misses its first PONG), and the replica it leaves behind then needs a
        # full resync: nothing comes for many seconds, and that is not a loss.
        reader.read_until(oracle.examples.keys(), 180, linger_s=1, stall_s=90)
    reader.drain()
    reader.close()
    examples = [x for x in reader.records if not x.request_id.startswith(f"req-{TICK_TAG}-")]
    unique = {x.example_id: x for x in examples}
    retries = joiner.metrics.registry.get_sample_value("stream_learner_joiner_retries_total", {"dependency": "redis"})
    print(
        f"\nsentinel: {len(oracle.examples)} expected, {seen_at_kill} before the master died; redis retries {retries}"
    )
    assert 0 < seen_at_kill < len(oracle.examples), "the master did not die mid-stream"
    problems = mismatches(examples, oracle)
    assert not problems, "\n".join(problems)
    assert Counter(x.kind for x in unique.values()) == oracle.counts()
    assert joiner.counts.dead_letters == 0
