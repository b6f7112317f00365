"""The checkpoint area's exceptions, all under :class:`CheckpointError`.

A serving node catches :class:`CheckpointError` to keep its last good model;
the subclasses say which check failed.
"""

from __future__ import annotations

from ..errors import StreamLearnerError


class CheckpointError(StreamLearnerError):
    """A checkpoint could not be encoded, published, found, read or trusted."""


class SignatureError(CheckpointError):
    """A manifest is unsigned, signed by an unknown key, or its signature does not verify."""


class DigestError(CheckpointError):
    """Reassembled weights do not have the size or SHA-256 their signed manifest states."""


class IncompleteCheckpointError(CheckpointError):
    """A chunk a manifest points at is missing, or belongs to another checkpoint."""


class CheckpointNotFoundError(CheckpointError):
    """No manifest for the requested model (or version) is on the topic."""


class LimitError(CheckpointError):
    """A checkpoint asks for more than the reader allows (declared size, chunks, safetensors header,
    tensor count, architecture): refused before the memory or the work is spent."""


class ReadTimeoutError(CheckpointError):
    """The broker did not deliver the records to read in time: worth retrying, unlike a failed check."""
