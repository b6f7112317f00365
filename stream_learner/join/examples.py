"""Joined examples from the join script's emissions: their deterministic ids and their bytes.

The joiner writes :func:`encode_example` to the examples topic; replay feeds
:func:`build_example` (the same example, decoded) straight to the learner.
"""

from __future__ import annotations

import hashlib

import msgspec

from ..events import ExampleEvent, Features, Prediction, Source
from .records import Emission


def example_id(kind: str, prediction_event_id: str, label_event_id: str | None) -> str:
    """The deterministic id of an example: the same inputs always give the same id.

    >>> example_id("labeled", "p-1", "l-1") == example_id("labeled", "p-1", "l-1")
    True
    >>> example_id("unlabeled", "p-1", None) != example_id("late", "p-1", "l-1")
    True
    """
    digest = hashlib.blake2b(f"{kind}\x1f{prediction_event_id}\x1f{label_event_id or ''}".encode(), digest_size=16)
    return digest.hexdigest()


class _ExampleOut(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """:class:`~stream_learner.events.ExampleEvent`'s fields, in its order, with the
    features and the prediction as already-encoded JSON: encoding one gives
    the bytes ``encode(ExampleEvent(...))`` gives, without their floats."""

    example_id: str
    kind: str
    request_id: str
    model: str
    model_version: str
    features: msgspec.Raw
    prediction: msgspec.Raw
    label: str | float | None
    prediction_event_id: str
    prediction_time: int
    prediction_source: Source | None = None
    label_event_id: str | None = None
    label_time: int | None = None
    label_source: Source | None = None


_encode_out = msgspec.json.Encoder().encode
_features = msgspec.json.Decoder(Features)
_prediction = msgspec.json.Decoder(Prediction)


def encode_example(emission: Emission) -> bytes:
    """The record value of the joined example for one emission (JSON, as :func:`~stream_learner.events.encode`)."""
    p, lab = emission.prediction, emission.label
    return _encode_out(
        _ExampleOut(
            example_id=example_id(emission.kind, p.event_id, lab.event_id if lab else None),
            kind=emission.kind,
            request_id=p.request_id,
            model=p.model,
            model_version=p.model_version,
            features=msgspec.Raw(p.features),
            prediction=msgspec.Raw(p.prediction),
            label=lab.label if lab else None,
            prediction_event_id=p.event_id,
            prediction_time=int(p.time),
            prediction_source=p.source,
            label_event_id=lab.event_id if lab else None,
            label_time=int(lab.time) if lab else None,
            label_source=lab.source if lab else None,
        )
    )


def build_example(emission: Emission) -> ExampleEvent:
    """The joined example for one emission, decoded (the joiner itself sends :func:`encode_example`)."""
    p, lab = emission.prediction, emission.label
    return ExampleEvent(
        example_id=example_id(emission.kind, p.event_id, lab.event_id if lab else None),
        kind=emission.kind,
        request_id=p.request_id,
        model=p.model,
        model_version=p.model_version,
        features=_features.decode(p.features),
        prediction=_prediction.decode(p.prediction),
        label=lab.label if lab else None,
        prediction_event_id=p.event_id,
        prediction_time=int(p.time),
        prediction_source=p.source,
        label_event_id=lab.event_id if lab else None,
        label_time=int(lab.time) if lab else None,
        label_source=lab.source if lab else None,
    )
