"""Publishing a checkpoint to the model topic: weights chunks first, then the signed manifest.

**The order** (:func:`publish_checkpoint`):

1. the safetensors weights are cut into chunks of at most ``chunk_bytes``
   and produced, keyed by the model name, all to one partition;
2. the broker acknowledges every chunk (``acks=all`` with the idempotent
   producer of :func:`stream_learner.bus.make_producer`), which gives their
   offsets;
3. the manifest, its ``weights.chunk_offsets`` filled in from those acks, is
   signed and produced to the same partition, and acknowledged.

So a manifest is only ever visible after all of its chunks, and a reader
that finds a manifest finds its chunks where it says. A failure before step 3
leaves orphan chunks that no manifest points at; readers skip them.

**Wire format.** Key: the model name (UTF-8). Value: a chunk's bytes, or the
manifest as ``manifest.v1`` JSON. Headers (UTF-8 values):

==================  =======================================================
``sl-type``         ``chunk`` or ``manifest``
``sl-model``        the model name
``sl-version``      the checkpoint version (decimal)
``sl-chunk-index``  chunks only: ``0`` .. ``count - 1``
``sl-chunk-count``  chunks only: how many chunks the weights have
``sl-sha256``       chunks only: SHA-256 of the *whole* weights (hex)
==================  =======================================================

Headers let a reader skip records without decoding them; they are not
signed, so readers check every one against the signed manifest.

The default chunk size, 512 KiB, stays well below Apache Kafka's default
1 MiB ``message.max.bytes``. The model topic must keep
``cleanup.policy=delete``: every record of a model shares its key, so log
compaction would keep only the last manifest and drop the chunks. Its
retention must outlast the time a serving node may need the newest
checkpoint (unlimited is the safe choice).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import msgspec
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..bus import KAFKA_ERRORS
from ..events import CheckpointManifest, WeightsInfo, encode
from .digest import sha256_hex
from .errors import CheckpointError, DigestError
from .signing import sign_manifest

log = structlog.get_logger(__name__)

#: Largest chunk value by default: half of Kafka's default 1 MiB record limit.
DEFAULT_CHUNK_BYTES = 512 * 1024

H_TYPE = "sl-type"
H_MODEL = "sl-model"
H_VERSION = "sl-version"
H_CHUNK_INDEX = "sl-chunk-index"
H_CHUNK_COUNT = "sl-chunk-count"
H_SHA256 = "sl-sha256"
TYPE_CHUNK = b"chunk"
TYPE_MANIFEST = b"manifest"


class Producer(Protocol):
    """What :func:`publish_checkpoint` needs of a ``kafka.KafkaProducer``."""

    def send(
        self, topic: str, *, key: bytes, value: bytes, headers: list[tuple[str, bytes]], partition: int | None = None
    ) -> Any:
        """Send one record; return a future whose ``get(timeout)`` gives ``partition`` and ``offset``."""
        ...


def weights_info(weights: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> WeightsInfo:
    """The ``weights`` field describing ``weights`` cut into ``chunk_bytes`` chunks.

    ``chunk_offsets`` stays empty: :func:`publish_checkpoint` fills it.

    >>> info = weights_info(b"x" * 1000, chunk_bytes=300)
    >>> info.size, info.chunks, info.chunk_offsets
    (1000, 4, [])
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
    if not weights:
        raise ValueError("weights are empty; a safetensors file is at least 8 bytes")
    return WeightsInfo(
        format="safetensors",
        size=len(weights),
        chunks=math.ceil(len(weights) / chunk_bytes),
        sha256=sha256_hex(weights),
    )


def _headers(manifest: CheckpointManifest, kind: bytes) -> list[tuple[str, bytes]]:
    return [
        (H_TYPE, kind),
        (H_MODEL, manifest.model.encode()),
        (H_VERSION, str(manifest.version).encode()),
    ]


def publish_checkpoint(
    producer: Producer,
    topic: str,
    manifest: CheckpointManifest,
    weights: bytes,
    private_key: Ed25519PrivateKey,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout_s: float = 60.0,
) -> CheckpointManifest:
    """Publish ``weights`` and its manifest, in that order; return the signed manifest.

    ``manifest`` describes the checkpoint; its ``weights`` field must state
    the ``size`` and ``sha256`` of ``weights`` (build it with
    :func:`weights_info`), a guard against publishing a manifest with the
    wrong bytes. Its ``chunks`` and ``chunk_offsets`` are set here from how
    the weights were actually chunked and where the broker stored them, and
    any ``signature`` is replaced. Chunks are produced first and each is
    acknowledged; only then is the manifest signed with ``private_key`` and
    produced, to the same partition as the chunks. Returns once the broker
    has acknowledged the manifest too.

    ``producer`` is a ``kafka.KafkaProducer`` (use
    :func:`stream_learner.bus.make_producer`: idempotent, ``acks=all``); its
    ``max_request_size`` must exceed ``chunk_bytes`` plus a few hundred
    bytes of record overhead.

    The trainer calls this only after the state this checkpoint describes is
    durable (see :mod:`stream_learner.checkpoint.state`).

    Raises :class:`DigestError` if ``manifest.weights`` does not describe
    ``weights``, and :class:`CheckpointError` if the broker refuses or does
    not acknowledge a record within ``timeout_s`` (the manifest is then not
    published, and the call may be retried as a whole).
    """
    info = weights_info(weights, chunk_bytes)
    if (manifest.weights.size, manifest.weights.sha256) != (info.size, info.sha256):
        raise DigestError(
            f"manifest {manifest.model} v{manifest.version} describes {manifest.weights.size} bytes "
            f"with sha256 {manifest.weights.sha256[:12]}..., the weights given are {info.size} bytes "
            f"with sha256 {info.sha256[:12]}..."
        )
    key = manifest.model.encode()
    what = f"checkpoint {manifest.model} v{manifest.version}"
    chunk_headers = _headers(manifest, TYPE_CHUNK) + [
        (H_CHUNK_COUNT, str(info.chunks).encode()),
        (H_SHA256, info.sha256.encode()),
    ]

    def send(value: bytes, headers: list[tuple[str, bytes]], partition: int | None) -> Any:
        try:
            return producer.send(topic, key=key, value=value, headers=headers, partition=partition)
        except KAFKA_ERRORS as exc:
            raise CheckpointError(f"{what}: the producer refused a record: {exc}") from exc

    def acked(future: Any, label: str) -> Any:
        try:
            return future.get(timeout=timeout_s)
        except KAFKA_ERRORS as exc:
            raise CheckpointError(f"{what}: {label} not acknowledged: {exc}") from exc

    view = memoryview(weights)

    def chunk(i: int) -> bytes:
        return bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])

    def headers_of(i: int) -> list[tuple[str, bytes]]:
        return chunk_headers + [(H_CHUNK_INDEX, str(i).encode())]

    # The first chunk's ack picks the partition (by key); the rest and the
    # manifest are pinned to it, because chunk_offsets name offsets in the
    # manifest's partition even if the partition count changes meanwhile.
    first = acked(send(chunk(0), headers_of(0), None), "chunk 0")
    partition = first.partition
    futures = [send(chunk(i), headers_of(i), partition) for i in range(1, info.chunks)]
    offsets = [first.offset] + [acked(f, f"chunk {i}").offset for i, f in enumerate(futures, start=1)]

    complete = msgspec.structs.replace(
        manifest, weights=msgspec.structs.replace(info, chunk_offsets=offsets), signature=None
    )
    signed = sign_manifest(complete, private_key)
    meta = acked(send(encode(signed), _headers(signed, TYPE_MANIFEST), partition), "manifest")
    log.info(
        "checkpoint_published",
        model=signed.model,
        version=signed.version,
        topic=topic,
        partition=partition,
        manifest_offset=meta.offset,
        size=info.size,
        chunks=info.chunks,
    )
    return signed
