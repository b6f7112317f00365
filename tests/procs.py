"""Running stream-learner roles as real processes in tests."""

from __future__ import annotations

import os

from stream_learner.config import FIELDS, Settings, env_name


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``stream-learner`` load exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_LEARNER_")}
    defaults = Settings()
    for field in FIELDS:
        value = getattr(settings, field)
        if value == getattr(defaults, field) or value is None:
            continue
        if isinstance(value, bool):
            env[env_name(field)] = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            env[env_name(field)] = ",".join(map(str, value))
        else:
            env[env_name(field)] = str(value)
    return env


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
