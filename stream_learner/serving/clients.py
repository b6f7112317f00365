"""The subscriber's two Kafka consumers, and the records each has read.

Both are kafka-python consumers without a group
(:func:`~stream_learner.checkpoint.reader.make_reader_consumer`), made
together on first use and closed together:

* the **follower** reads the model topic forward; only the subscriber's
  loop (its thread, or the caller of ``poll_once``) uses it;
* the **loader** catches up, fetches a manifest's chunks by offset and reads
  a pinned version: the loop and callers of ``pin`` share it, so it is only
  used inside ``with clients.loading() as loader:``, which holds the lock.
  :meth:`ReaderClients.close` takes the same lock, so a read is never cut
  short by a close from another thread.

Each consumer counts the records its polls return (the work a read did);
:meth:`ReaderClients.records` adds those of consumers closed since.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from ..checkpoint.reader import make_reader_consumer
from ..config import Settings

log = structlog.get_logger(__name__)

__all__ = ["CountingConsumer", "ReaderClients"]


class CountingConsumer:
    """A consumer proxy that counts the records its polls return."""

    def __init__(self, inner: KafkaConsumer) -> None:
        self.inner = inner
        self.records = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord]]:
        """``KafkaConsumer.poll``, counted."""
        batch: dict[TopicPartition, list[ConsumerRecord]] = self.inner.poll(timeout_ms=timeout_ms,
                                                                            max_records=max_records)
        self.records += sum(len(records) for records in batch.values())
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ReaderClients:
    """The follower and the loader of one subscriber (see the module docstring)."""

    def __init__(self, settings: Settings, options: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.options = dict(options or {})  # kafka-python options for both consumers
        self.follower: CountingConsumer | None = None
        self.loader: CountingConsumer | None = None
        self._closed = [0, 0]  # records read by consumers closed since: (follower, loader)
        self._lock = threading.Lock()  # the loader, and making and closing both

    def _open(self) -> tuple[CountingConsumer, CountingConsumer]:
        """Both consumers, made if needed; the caller holds the lock."""
        if self.loader is None:
            self.loader = CountingConsumer(make_reader_consumer(self.settings, **self.options))
        if self.follower is None:
            self.follower = CountingConsumer(make_reader_consumer(self.settings, **self.options))
        return self.follower, self.loader

    def open(self) -> CountingConsumer:
        """Make both consumers if they are not there (broker errors raise); the follower."""
        with self._lock:
            return self._open()[0]

    @contextmanager
    def loading(self) -> Iterator[CountingConsumer]:
        """The loader, for this thread alone until the block ends."""
        with self._lock:
            yield self._open()[1]

    def close(self) -> None:
        """Close both consumers (best effort); the next use makes new ones."""
        with self._lock:
            for index, name in enumerate(("follower", "loader")):
                client: CountingConsumer | None = getattr(self, name)
                if client is None:
                    continue
                try:
                    client.inner.close()
                except Exception as exc:  # noqa: BLE001 - closing is best effort
                    log.debug("subscriber_close_failed", client=f"_{name}", error=str(exc))
                self._closed[index] += client.records
                setattr(self, name, None)

    def records(self) -> tuple[int, int]:
        """Records read so far by (the followers, the loaders), closed ones included; without the lock."""
        follower, loader = self.follower, self.loader  # locals: close() may None them meanwhile
        return (self._closed[0] + (follower.records if follower else 0),
                self._closed[1] + (loader.records if loader else 0))
