"""Where a learning session's checkpoints go: the model topic, or a directory.

Both write a lineage's versions in order, weights before the signed
manifest, and can tell the newest version they hold (a session that crashed
between saving its state and publishing republishes that version). The live
trainer publishes to the topic; a replay to the topic or a directory.

A directory holds, per lineage, ``<lineage>/v00000001.safetensors`` and
``<lineage>/v00000001.manifest.json`` (the signed ``manifest.v1`` JSON,
``weights.chunk_offsets`` empty since nothing is chunked on disk), each
written atomically (:func:`~stream_learner.util.files.atomic_write`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

import msgspec
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..bus import Producer, make_producer
from ..config import Settings
from ..events import MANIFEST, CheckpointManifest, encode
from ..util.files import atomic_write
from ..util.retry import Retry, is_transient
from .errors import CheckpointError, DigestError
from .publish import publish_checkpoint, weights_info
from .reader import make_reader_consumer
from .scan import newest_version
from .signing import sign_manifest

log = structlog.get_logger(__name__)


class Output(Protocol):
    """A destination for one lineage's checkpoints."""

    def latest_version(self) -> int:
        """The newest version of the lineage it holds (0 for none)."""
        ...

    def publish(self, manifest: CheckpointManifest, weights: bytes) -> CheckpointManifest:
        """Write the weights, then the signed manifest; return the signed manifest."""
        ...

    def close(self) -> None:
        """Release clients."""
        ...


def publish_transient(exc: BaseException) -> bool:
    """True for a publish that failed because the broker was away (worth publishing again, whole).

    A refused record, a missing ACL, a record too large, weights that do not
    match their manifest: not transient, raised at once.

    >>> from stream_learner.bus.kafka_python import errors
    >>> def failed(cause):
    ...     try:
    ...         raise CheckpointError("checkpoint m v1: chunk 0 not acknowledged") from cause
    ...     except CheckpointError as exc:
    ...         return exc
    >>> timeout, acl = errors.KafkaTimeoutError(), errors.TopicAuthorizationFailedError()
    >>> publish_transient(failed(timeout)), publish_transient(failed(acl))
    (True, False)
    """
    if isinstance(exc, DigestError):
        return False
    if isinstance(exc, CheckpointError):
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    return is_transient(exc)


class TopicOutput:
    """Checkpoints of ``lineage`` on the model topic, chunked and signed.

    ``producer`` (default: one of its own, closed with it) must allow
    records of ``trainer_chunk_bytes`` plus headers. With ``retry``, a
    publish the broker fails transiently (:func:`publish_transient`) is
    published again, whole, after a back-off, until it succeeds or the
    retry's stop is set (:class:`~stream_learner.util.retry.Stopped`); a
    permanent error is raised at once. A publish cut short leaves at worst
    orphan chunks (no manifest names them; readers skip them) or, when only
    the manifest's acknowledgement was lost, the same version twice, which
    readers ignore as not newer.
    """

    def __init__(
        self,
        settings: Settings,
        lineage: str,
        private_key: Ed25519PrivateKey,
        *,
        producer: Producer | None = None,
        retry: Retry | None = None,
    ) -> None:
        self.settings = settings
        self.retry = retry
        self.lineage = lineage
        self.private_key = private_key
        self.own_producer = producer is None
        self.producer = producer or make_producer(settings, max_request_size=settings.trainer_chunk_bytes + 64 * 1024)

    def latest_version(self) -> int:
        consumer = make_reader_consumer(self.settings)
        try:
            version, refused = newest_version(
                consumer, self.settings.topic_models, self.private_key.public_key(), self.lineage
            )
        finally:
            consumer.close()
        for r in refused:  # unsigned or forged records at the end must not stop the trainer
            log.warning(
                "output_record_refused",
                lineage=self.lineage,
                reason=r.reason,
                partition=r.partition,
                offset=r.offset,
                error=str(r.error),
            )
        return version

    def publish(self, manifest: CheckpointManifest, weights: bytes) -> CheckpointManifest:
        def once() -> CheckpointManifest:
            return publish_checkpoint(
                self.producer,
                self.settings.topic_models,
                manifest,
                weights,
                self.private_key,
                chunk_bytes=self.settings.trainer_chunk_bytes,
            )

        return self.retry.call(once) if self.retry is not None else once()

    def close(self) -> None:
        if self.own_producer:
            self.producer.close()


_VERSION_FILE = re.compile(r"^v(\d{8,})\.manifest\.json$")


class DirectoryOutput:
    """Checkpoints as files under ``<root>/<lineage>/`` (see the module docstring)."""

    def __init__(
        self, root: str | os.PathLike[str], lineage: str, private_key: Ed25519PrivateKey, chunk_bytes: int
    ) -> None:
        self.path = Path(root) / lineage
        self.path.mkdir(parents=True, exist_ok=True)
        self.private_key = private_key
        self.chunk_bytes = chunk_bytes

    def latest_version(self) -> int:
        versions = [int(m[1]) for f in self.path.iterdir() if (m := _VERSION_FILE.match(f.name))]
        return max(versions, default=0)

    def manifest(self, version: int) -> CheckpointManifest:
        """The signed manifest of ``version`` (not verified here)."""
        return MANIFEST.decode((self.path / f"v{version:08d}.manifest.json").read_bytes())

    def weights_path(self, version: int) -> Path:
        """The safetensors file of ``version``."""
        return self.path / f"v{version:08d}.safetensors"

    def publish(self, manifest: CheckpointManifest, weights: bytes) -> CheckpointManifest:
        info = weights_info(weights, self.chunk_bytes)
        signed = sign_manifest(msgspec.structs.replace(manifest, weights=info, signature=None), self.private_key)
        atomic_write(self.weights_path(manifest.version), weights)
        atomic_write(self.path / f"v{manifest.version:08d}.manifest.json", encode(signed))
        return signed

    def close(self) -> None:
        pass
