"""Trusting a manifest record: it decodes as ``manifest.v1``, its signature verifies with a
trusted key, and its headers agree with what it signs (checks 1 and 2 of
:mod:`stream_learner.checkpoint.reader`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import EventError
from ..events import MANIFEST, CheckpointManifest
from .errors import CheckpointError
from .fetch import record_header
from .publish import H_MODEL, H_VERSION
from .signing import verify_manifest

PublicKeys = Ed25519PublicKey | Iterable[Ed25519PublicKey]


def key_list(public_key: PublicKeys) -> list[Ed25519PublicKey]:
    """One trusted key or several, as a list."""
    return [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)


@dataclass
class Candidate:
    """A verified manifest, its record, and the records read along with it."""

    manifest: CheckpointManifest
    record: Any
    window: Mapping[int, Any]  # records read along with it, by offset: its chunks are often there


def verify_record(topic: str, record: Any, window: Mapping[int, Any], keys: list[Ed25519PublicKey]) -> Candidate:
    """Checks 1 and 2 of :mod:`stream_learner.checkpoint.reader` on one manifest record: it decodes,
    its signature verifies with one of ``keys``, its headers agree (:class:`CheckpointError` if not)."""
    where = f"{topic}[{record.partition}]@{record.offset}"
    try:
        manifest = MANIFEST.decode(record.value)
    except EventError as exc:
        raise CheckpointError(f"manifest at {where} is invalid: {exc}") from None
    except RecursionError:
        # msgspec refuses deep nesting this way (in drift_state or architecture).
        raise CheckpointError(f"manifest at {where} is invalid: it nests too deeply") from None
    verify_manifest(manifest, keys)
    # Headers are not signed: a record whose headers disagree with its
    # signed manifest was not written by the publisher.
    if (record_header(record, H_MODEL), record_header(record, H_VERSION)) != (
        manifest.model.encode(),
        str(manifest.version).encode(),
    ):
        raise CheckpointError(
            f"manifest at {where} is {manifest.model} v{manifest.version} but its headers say "
            f"{record_header(record, H_MODEL)!r} v{record_header(record, H_VERSION)!r}"
        )
    return Candidate(manifest, record, window)
