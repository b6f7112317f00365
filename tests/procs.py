"""Running stream-learner roles as real processes in tests."""

from __future__ import annotations

import random
import socket

from stream_learner.config import Settings, settings_env

__all__ = ["children", "free_port_pair", "read_topic", "settings_env"]


def free_port_pair() -> int:
    """A port P on 127.0.0.1 with P and P + 1 free, below the ephemeral range: a role serves on
    ``metrics_port + 1`` too (run's joiner process, a trainer's rank 1), and P + 1 taken from that
    range could meanwhile be any outgoing connection's."""
    for _ in range(200):
        port = random.randrange(20_000, 32_000)
        socks = [socket.socket() for _ in range(2)]
        try:
            for i, sock in enumerate(socks):
                sock.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no two consecutive free ports in 20000..32000")


def read_topic(settings: Settings, topic: str, *, partition: int = 0) -> list:
    """Every record of one partition of ``topic``, from the beginning to its current end."""
    from kafka import TopicPartition

    from stream_learner.bus import make_consumer

    consumer = make_consumer(settings, group_id=None)
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    records: list = []
    while consumer.position(tp) < end:
        for batch in consumer.poll(1000).values():
            records.extend(batch)
    consumer.close()
    return records


def train_uninterrupted(settings: Settings, n: int) -> None:
    """The reference of a kill storm: a trainer in this process reads ``n`` examples, learns them all and
    checkpoints once more, never stopped."""
    from stream_learner.learn.trainer import Trainer

    ref = Trainer(settings)  # the same construction as the CLI, drift detectors included
    try:
        while sum(ref.offsets.values()) < n or ref.buffer:
            ref.step()
        ref.checkpoint()
    finally:
        ref.close()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    import os
    from pathlib import Path

    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out
