"""How the serving side names a refused checkpoint or a failed read.

Reasons: ``signature``, ``digest``, ``incomplete``, ``not_found``,
``invalid``, ``limit``, ``architecture``, ``not_allowed``, ``state``,
``smoke``, ``downgrade`` (a version below the highest good one the node
knows), ``unconfirmed`` (the start scan's budget ran out before it could
rule out a replay), ``oversized`` (a record too large to receive, skipped),
``no_base`` (a delta checkpoint on a frozen base this node does not hold),
``broker``, ``error``.

Every failure is counted under one ``reason`` label
(``stream_learner_serving_swap_failures_total{reason}``) and shown as
``status()["last_error"]`` (``"reason: message"``). Only ``broker`` is
*transient*: the read is retried as it was, after a back-off; every other
reason is a failed check, and the version is refused.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..bus import KAFKA_ERRORS
from ..checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DigestError,
    IncompleteCheckpointError,
    LimitError,
    ReadTimeoutError,
    SignatureError,
)

__all__ = ["Failed", "ModelLoadError", "Refused", "failure_reason", "is_transient"]


class ModelLoadError(CheckpointError):
    """A verified checkpoint cannot be served: its architecture does not match its
    weights (``reason="architecture"``), is not allowed on this node
    (``"not_allowed"``) or exceeds its bounds (``"limit"``), its statistics are
    not a state a learner can be in (``"state"``), its smoke prediction is
    not finite (``"smoke"``), or it is a delta on a base the node does not
    hold (``"no_base"``)."""

    def __init__(self, message: str, reason: str = "architecture") -> None:
        super().__init__(message)
        self.reason = reason


class Refused(ModelLoadError):
    """A record refused by a rule of the serving side itself (a downgrade, an oversized record, ...),
    counted under ``reason``."""

    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(str(error), reason)


class Failed(Protocol):
    """Count and log a failure (the subscriber's ``_failed``, which its parts are handed)."""

    def __call__(self, exc: BaseException, *, what: str = "", **context: Any) -> None: ...


def failure_reason(exc: BaseException) -> str:
    """The ``reason`` label under which a failure is counted.

    >>> failure_reason(SignatureError("x")), failure_reason(ModelLoadError("y", "smoke"))
    ('signature', 'smoke')
    >>> failure_reason(CheckpointError("not safetensors data: ...")), failure_reason(ReadTimeoutError("t"))
    ('invalid', 'broker')
    """
    if isinstance(exc, SignatureError):
        return "signature"
    if isinstance(exc, DigestError):
        return "digest"
    if isinstance(exc, IncompleteCheckpointError):
        return "incomplete"
    if isinstance(exc, CheckpointNotFoundError):
        return "not_found"
    if isinstance(exc, ModelLoadError):
        return exc.reason
    if isinstance(exc, LimitError):
        return "limit"
    if isinstance(exc, ReadTimeoutError):
        return "broker"
    if isinstance(exc, CheckpointError):
        return "invalid"  # an undecodable manifest, headers that lie, weights that are not safetensors
    if isinstance(exc, (*KAFKA_ERRORS, OSError)):
        return "broker"
    return "error"


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying as they are (the broker), not for failed checks.

    >>> is_transient(ConnectionResetError()), is_transient(DigestError("sha256 mismatch"))
    (True, False)
    """
    return failure_reason(exc) == "broker"
