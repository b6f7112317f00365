"""Assembling a checkpoint's weights: its chunks fetched by offset, checked, joined and decoded.

Checks 3-5 of :mod:`stream_learner.checkpoint.reader`, and the limits a
serving node sets (:class:`LoadLimits`), each applied before the memory it
guards is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bus import TopicPartition
from .codec import MAX_HEADER_BYTES, decode_tensors, header_length, sha256_hex
from .errors import DigestError, IncompleteCheckpointError, LimitError
from .fetch import Overflow, RecordReader, record_header
from .publish import H_CHUNK_COUNT, H_CHUNK_INDEX, H_MODEL, H_SHA256, H_TYPE, H_VERSION, TYPE_CHUNK
from .verify import Candidate


@dataclass(frozen=True)
class LoadLimits:
    """What one checkpoint may ask of a reader, checked before the memory is spent.

    ``max_bytes`` bounds the weights the manifest declares (checked before a
    chunk is fetched) and what its chunks add up to (checked as they
    arrive); ``max_header_bytes`` and ``max_tensors`` bound the safetensors
    header (checked on the first chunk's first 8 bytes, then before it is
    parsed). ``None`` (the trainer's own reads): only the format's limits.
    """

    max_bytes: int = 1 << 30
    max_header_bytes: int = 1 << 20
    max_tensors: int = 1024


def load_weights(
    reader: RecordReader, candidate: Candidate, limits: LoadLimits | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights of a verified ``candidate``: its chunks fetched by offset (or taken from its
    window), checked, reassembled and decoded (checks 3-5 of :mod:`stream_learner.checkpoint.reader`).

    ``limits`` bounds the declared size, the chunks as they arrive and the safetensors header
    (:class:`LoadLimits`); ``None``: only the format's limits.
    """
    manifest, record = candidate.manifest, candidate.record
    info = manifest.weights
    what = f"checkpoint {manifest.model} v{manifest.version}"
    tp = TopicPartition(reader.topic, record.partition)
    offsets = info.chunk_offsets
    if len(offsets) != info.chunks:
        raise IncompleteCheckpointError(f"{what}: manifest lists {len(offsets)} chunk offsets for {info.chunks} chunks")
    # Bounded before anything is fetched: the declared size, and chunks of at least a byte.
    if limits is not None and info.size > limits.max_bytes:
        raise LimitError(f"{what}: the manifest declares {info.size} bytes of weights, the limit is {limits.max_bytes}")
    if info.chunks > max(1, info.size):
        raise IncompleteCheckpointError(f"{what}: {info.chunks} chunks for {info.size} bytes")
    needed = set(offsets)
    window = candidate.window
    # Looked up by the offsets needed, not by walking the window (the follower's may be large).
    have = {o: window[o] for o in needed if o in window}
    missing = sorted(needed - set(have))
    low, high = reader.begin[tp], record.offset
    for off in missing:
        if not low <= off < high:
            raise IncompleteCheckpointError(
                f"{what}: chunk offset {off} is outside {reader.topic}[{tp.partition}] "
                f"offsets {low}..{high - 1} (deleted by retention, or never written)"
            )
    max_header = limits.max_header_bytes if limits is not None else MAX_HEADER_BYTES
    if limits is not None and offsets:
        # The safetensors header length is in chunk 0's first 8 bytes: a header over the limit
        # is refused before the other chunks are fetched.
        first = offsets[0]
        if first not in have and low <= first < high:
            for rec in reader.read_range(tp, first, first + 1):
                have[rec.offset] = rec
            missing = [o for o in missing if o not in have]
        chunk0 = have.get(first)
        if chunk0 is not None and chunk0.value and len(chunk0.value) >= 8:
            header_length(chunk0.value[:8], max_header)
    # Contiguous offsets are fetched with one seek; a gap means another seek. What the
    # chunks add up to is checked as they arrive: never more than the declared size is held.
    held = sum(len(r.value or b"") for r in have.values())
    for lo, hi in _runs(missing):
        try:
            records = reader.read_range(tp, lo, hi, max_bytes=info.size - held)
        except Overflow:
            raise DigestError(f"{what}: its chunks hold more than the {info.size} bytes the manifest says") from None
        for rec in records:
            have[rec.offset] = rec
            held += len(rec.value or b"")
    expect = {
        H_TYPE: TYPE_CHUNK,
        H_MODEL: manifest.model.encode(),
        H_VERSION: str(manifest.version).encode(),
        H_CHUNK_COUNT: str(info.chunks).encode(),
        H_SHA256: info.sha256.encode(),
    }
    parts: list[bytes] = []
    for index, off in enumerate(offsets):
        chunk = have.get(off)
        if chunk is None:
            raise IncompleteCheckpointError(f"{what}: chunk {index} at offset {off} is missing")
        got = {name: record_header(chunk, name) for name in expect}
        got_index = record_header(chunk, H_CHUNK_INDEX)
        if got != expect or got_index != str(index).encode():
            raise IncompleteCheckpointError(
                f"{what}: the record at offset {off} is not its chunk {index}: headers "
                f"{ {k: v for k, v in got.items() if v != expect[k]} } index {got_index!r}"
            )
        parts.append(chunk.value or b"")
    total = sum(len(p) for p in parts)
    if total != info.size:
        raise DigestError(f"{what}: weights are {total} bytes, the manifest says {info.size}")
    if parts and len(parts[0]) < 8:
        header_length(b"".join(parts)[:8], max_header)  # a first chunk shorter than the length field
    data = b"".join(parts)
    del parts, have
    digest = sha256_hex(data)
    if digest != info.sha256:
        raise DigestError(f"{what}: weights sha256 {digest} != manifest's {info.sha256}")
    return decode_tensors(
        data, max_header_bytes=max_header, max_tensors=limits.max_tensors if limits is not None else None
    )


def _runs(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets as half-open ranges of consecutive offsets.

    >>> _runs([3, 4, 5, 9, 11, 12])
    [(3, 6), (9, 10), (11, 13)]
    """
    runs: list[tuple[int, int]] = []
    for off in offsets:
        if runs and runs[-1][1] == off:
            runs[-1] = (runs[-1][0], off + 1)
        else:
            runs.append((off, off + 1))
    return runs
