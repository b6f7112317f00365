"""The v1 shapes of the events that v2 widened: what the ``*.v1`` schema files are generated from.

``prediction.v1`` and ``example.v1`` hold numbers and ``null`` as feature
values. The v2 structs of
:mod:`stream_learner.events` accept everything these accept (every v1 event
decodes as v2), so the roles decode with v2 alone; these stay, unchanged, so
that the v1 files keep saying exactly what v1 producers and readers were
promised, and the tests can prove that the v1 codecs refuse what the v1
files refuse. Never change them: a change is a new version.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from .events.codec import Codec
from .events.quotes import QUOTE_COUNTS, example_quotes, prediction_quotes
from .events.wire import (
    MAX_FEATURES,
    EventTime,
    ExampleKind,
    Finite,
    Ident,
    Label,
    Name,
    Prediction,
    Source,
    Version,
)

__all__ = ["EXAMPLE_V1", "PREDICTION_V1", "ExampleEvent", "FeaturesV1", "PredictionEvent"]

FeaturesV1 = Annotated[dict[Name, Finite | None], Meta(max_length=MAX_FEATURES)]
Features = FeaturesV1  # the name the v1 structs below were written with


class PredictionEvent(Struct, frozen=True, kw_only=True):
    """What an application served for one request (schema ``prediction.v1``)."""

    event_id: Ident
    request_id: Ident
    model: Name
    model_version: Version
    event_time: EventTime
    features: Features
    prediction: Prediction


class ExampleEvent(Struct, frozen=True, kw_only=True):
    """A prediction joined with its label, or closed without one (schema ``example.v1``).

    ``labeled``: the label came within the window. ``unlabeled``: the window
    closed with no label (input of the pseudo-label step). ``late``: the label
    came after the prediction's window had closed.
    """

    example_id: Ident
    kind: ExampleKind
    request_id: Ident
    model: Name
    model_version: Version
    features: Features
    prediction: Prediction
    label: Label | None
    prediction_event_id: Ident
    prediction_time: EventTime
    prediction_source: Source | None = None
    label_event_id: Ident | None = None
    label_time: EventTime | None = None
    label_source: Source | None = None


# The same fast proof as v2's (a v1 event has no string feature values). Before the codecs, which
# look it up when they are made.
QUOTE_COUNTS.setdefault(PredictionEvent, prediction_quotes)
QUOTE_COUNTS.setdefault(ExampleEvent, example_quotes)

#: Strict v1 decoders (the tests' reference for the v1 files; the roles decode with v2).
PREDICTION_V1: Codec[PredictionEvent] = Codec(PredictionEvent)
EXAMPLE_V1: Codec[ExampleEvent] = Codec(ExampleEvent)
