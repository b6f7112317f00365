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
  short by a close from another thread;
* the **prober** reads one record batch per fetch (see
  :func:`~stream_learner.checkpoint.fetch.probe`), to find and move past a
  record too large to receive; only the loop uses it, made on first use.

Every consumer refuses a response larger than ``receive_limit`` bytes
before reading it (kafka-python's ``receive_message_max_bytes``), so one
huge record costs no memory; fetches are sized so that legitimate
responses stay below that limit.

Each consumer counts the records its polls return (the work a read did);
:meth:`ReaderClients.records` adds those of consumers closed since.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog

from ..bus import Consumer, Record, TopicPartition
from ..checkpoint.reader import make_reader_consumer
from ..config import Settings

log = structlog.get_logger(__name__)

#: Bytes one fetch asks for, per partition and in all (a response may add one larger batch).
FETCH_BYTES = 2 * 1024 * 1024

__all__ = ["CountingConsumer", "ReaderClients"]


class CountingConsumer:
    """A consumer proxy that counts the records its polls return."""

    def __init__(self, inner: Consumer) -> None:
        self.inner = inner
        self.records = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        """``KafkaConsumer.poll``, counted."""
        batch: dict[TopicPartition, list[Record]] = self.inner.poll(timeout_ms=timeout_ms, max_records=max_records)
        self.records += sum(len(records) for records in batch.values())
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ReaderClients:
    """The follower and the loader of one subscriber (see the module docstring)."""

    def __init__(
        self, settings: Settings, options: Mapping[str, Any] | None = None, *, receive_limit: int = 16 * 1024 * 1024
    ) -> None:
        self.settings = settings
        fetch = min(FETCH_BYTES, receive_limit // 2)
        # kafka-python options for every consumer: a response holds at most about `fetch` bytes
        # plus one batch, refused unread above the limit.
        self.options = {
            "fetch_max_bytes": fetch,
            "max_partition_fetch_bytes": fetch,
            "receive_message_max_bytes": receive_limit + fetch,
            **dict(options or {}),
        }
        self.follower: CountingConsumer | None = None
        self.loader: CountingConsumer | None = None
        self.prober: CountingConsumer | None = None
        self._closed = [0, 0]  # records read by consumers closed since: (follower, loader)
        self._lock = threading.Lock()  # the loader, and making and closing all

    def _open(self) -> tuple[CountingConsumer, CountingConsumer]:
        """Both consumers, made if needed; the caller holds the lock."""
        if self.loader is None:
            self.loader = CountingConsumer(make_reader_consumer(self.settings, **self.options))
        if self.follower is None:
            self.follower = CountingConsumer(make_reader_consumer(self.settings, **self.options))
        return self.follower, self.loader

    def probing(self) -> CountingConsumer:
        """The prober (the loop's alone), made if needed."""
        with self._lock:
            if self.prober is None:
                self.prober = CountingConsumer(
                    make_reader_consumer(
                        self.settings, **{**self.options, "max_partition_fetch_bytes": 1, "fetch_max_bytes": 1}
                    )
                )
            return self.prober

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
            for index, name in enumerate(("follower", "loader", "prober")):
                client: CountingConsumer | None = getattr(self, name)
                if client is None:
                    continue
                try:
                    client.inner.close()
                except Exception as exc:  # noqa: BLE001 - closing is best effort
                    log.debug("subscriber_close_failed", client=f"_{name}", error=str(exc))
                if index < 2:
                    self._closed[index] += client.records
                setattr(self, name, None)

    def records(self) -> tuple[int, int]:
        """Records read so far by (the followers, the loaders), closed ones included; without the lock."""
        follower, loader = self.follower, self.loader  # locals: close() may None them meanwhile
        return (
            self._closed[0] + (follower.records if follower else 0),
            self._closed[1] + (loader.records if loader else 0),
        )
