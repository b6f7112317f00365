"""Tensors to bytes and back, with safetensors only.

Weights and trainer state cross process boundaries as `safetensors
<https://huggingface.co/docs/safetensors>`_ bytes: a length-prefixed JSON
header followed by raw tensor data. Reading them runs no code, unlike
``pickle`` (and ``torch.load``, which unpickles), so a forged checkpoint can
at worst be refused. Nothing in this package ever unpickles.

The format: 8 bytes, the header length ``N`` as a little-endian unsigned
integer; ``N`` bytes of a JSON object mapping tensor names to
``{"dtype", "shape", "data_offsets"}``, plus an optional ``"__metadata__"``
object of string to string; then the data.

>>> import torch
>>> data = encode_tensors({"w": torch.tensor([[1.0, 2.0]]), "step": torch.tensor(7)}, {"arch": "mlp"})
>>> tensors, metadata = decode_tensors(data)
>>> tensors["w"], tensors["step"], metadata
(tensor([[1., 2.]]), tensor(7), {'arch': 'mlp'})
>>> decode_tensors(b"\\x80\\x04K\\x01.")
Traceback (most recent call last):
...
stream_learner.checkpoint.errors.CheckpointError: not safetensors data: 5 bytes, shorter than the 8-byte header length
"""

from __future__ import annotations

import json
import struct
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from .digest import sha256_hex
from .errors import CheckpointError, LimitError

__all__ = ["MAX_HEADER_BYTES", "decode_tensors", "encode_tensors", "header_length", "read_header", "sha256_hex"]

#: The safetensors reference implementation refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize named tensors (and string metadata) as safetensors bytes.

    Tensors are moved to the CPU and made contiguous first (safetensors
    refuses strided views). Tensors sharing storage, such as tied weights,
    are copied: the format has no aliasing, so each is stored in full.
    The bytes are exactly what :func:`decode_tensors` reads back, bit for
    bit, dtype and shape included.

    Raises :class:`CheckpointError` for anything that is not a dense tensor
    or metadata that is not ``str -> str``.
    """
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"safetensors metadata must map str to str; offending keys: {bad!r}")
    flat: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[str, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"expected str -> torch.Tensor, got {name!r} -> {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise CheckpointError(f"tensor {name!r} is {tensor.layout}; only dense tensors can be stored")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            where = (str(t.device), t.untyped_storage().data_ptr())
            if where in seen_storage:
                t = t.clone()  # safetensors refuses aliased tensors
            else:
                seen_storage.add(where)
        flat[name] = t
    try:
        return safetensors.torch.save(flat, metadata=metadata)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot encode tensors as safetensors: {exc}") from exc


def header_length(data: bytes | bytearray | memoryview, max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """The header length safetensors bytes declare in their first 8 bytes, checked against
    ``max_header_bytes`` (:class:`LimitError`) and the data's length (:class:`CheckpointError`).

    A reader can call it on the first chunk alone, before assembling the rest.

    >>> header_length(encode_tensors({"w": torch.zeros(1)}))
    56
    >>> header_length(encode_tensors({"w": torch.zeros(1)}), max_header_bytes=16)
    Traceback (most recent call last):
    ...
    stream_learner.checkpoint.errors.LimitError: safetensors header of 56 bytes, the limit is 16
    """
    view = memoryview(data)
    if len(view) < 8:
        raise CheckpointError(f"not safetensors data: {len(view)} bytes, shorter than the 8-byte header length")
    (size,) = struct.unpack("<Q", view[:8])
    if size > max_header_bytes and size <= MAX_HEADER_BYTES:
        raise LimitError(f"safetensors header of {size} bytes, the limit is {max_header_bytes}")
    return int(size)


def read_header(
    data: bytes | bytearray | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int | None = None
) -> dict[str, Any]:
    """The JSON header of safetensors bytes, checked for shape but not for data.

    Raises :class:`CheckpointError` when ``data`` is not safetensors (a
    pickle, a ``torch.save`` zip, truncated bytes, ...), and
    :class:`LimitError` for a header longer than ``max_header_bytes`` or
    naming more than ``max_tensors`` tensors (both checked before the
    header is parsed into objects: a 100 MB header of a million tensors
    would cost gigabytes as Python objects).

    >>> read_header(encode_tensors({}, {"k": "v"}))
    {'__metadata__': {'k': 'v'}}
    """
    view = memoryview(data)
    size = header_length(view, max_header_bytes)
    if size < 2 or size > MAX_HEADER_BYTES or size > len(view) - 8:
        raise CheckpointError(
            f"not safetensors data: header length {size} is impossible for {len(view)} bytes "
            f"(first bytes {bytes(view[:8])!r})"
        )
    raw = bytes(view[8 : 8 + size])
    if raw[:1] != b"{":
        raise CheckpointError(f"not safetensors data: header does not start with '{{' ({raw[:8]!r})")
    # Every tensor entry has exactly one "data_offsets" key: counting the bytes bounds the
    # number of objects json.loads would build (a key inside a string only over-counts).
    if max_tensors is not None and (named := raw.count(b'"data_offsets"')) > max_tensors:
        raise LimitError(f"safetensors header names {named} tensors, the limit is {max_tensors}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"not safetensors data: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError("not safetensors data: header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError("safetensors __metadata__ must be an object of strings")
    return header


def decode_tensors(
    data: bytes | bytearray | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read safetensors bytes: ``(name -> CPU tensor, metadata)``.

    The header is parsed and checked here first (with the limits of
    :func:`read_header`), so input that is not safetensors is refused with
    a :class:`CheckpointError` that says so; it is never handed to an
    unpickler. Tensors are independent of ``data``.
    """
    header = read_header(data, max_header_bytes=max_header_bytes, max_tensors=max_tensors)
    try:
        tensors = safetensors.torch.load(bytes(data))
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"invalid safetensors data: {exc}") from exc
    return tensors, dict(header.get("__metadata__", {}))
