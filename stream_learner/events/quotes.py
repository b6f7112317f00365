"""The fast proof: how many quote characters the decoded event accounts for.

Every string of a JSON text (key or value) is two quote characters, and a
quote inside a string is escaped (one more). So the bytes hold at least
twice as many quotes as the decoded event has strings (its keys, string
values, feature and class names, string feature values), and exactly twice as many only if no key
is given twice, no field is unknown and no string holds an escaped quote.
An optional field that decoded to None may be absent or written as null:
a ``"name":null`` in the bytes is taken as the field (if it is not the
field, it is inside a string, hence escaped, or a key of an unknown object,
itself a string too much: either way the count stays above, never below,
and no repeat can hide behind it). A feature of that name could be the
one exception (features may be null), so such an event is always scanned.

:data:`QUOTE_COUNTS` holds the count of each wire event type that has one
(:mod:`stream_learner.events_v1` adds its v1 types); a codec of a type
without one scans every event it accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .wire import ExampleEvent, LabelEvent, PredictionEvent


def _nulls(name: str) -> tuple[str, bytes, bytes]:
    return name, f'"{name}":null'.encode(), f'"{name}": null'.encode()


def _null(data: bytes | bytearray, field: tuple[str, bytes, bytes], features: dict[str, Any] | None = None) -> int:
    """Quotes for an optional field (from :func:`_nulls`) that decoded to None: 2 if it is
    written as null, else 0; -1 (scan) when a feature has the field's name."""
    if features is not None and field[0] in features:
        return -1
    return 2 if data.find(field[1]) >= 0 or data.find(field[2]) >= 0 else 0


def prediction_quotes(ev: PredictionEvent, data: bytes | bytearray) -> int:
    """The quotes a prediction's bytes hold if nothing is repeated or unknown (string feature values aside)."""
    # 7 keys, 4 string values, the feature names, the class names.
    p = ev.prediction
    if p.__class__ is dict:
        return 22 + 2 * (len(ev.features) + len(p))
    return 22 + 2 * len(ev.features)


def label_quotes(ev: LabelEvent, data: bytes | bytearray) -> int:
    """The quotes a label's bytes hold if nothing is repeated or unknown."""
    # 4 required keys, 2 string values, a class name, the model (key and value).
    n = 12 + (2 if type(ev.label) is str else 0)
    return n + 4 if ev.model is not None else n + _null(data, _MODEL)


_MODEL = _nulls("model")


_SOURCE_QUOTES = 10  # the field's key, three keys, the topic


def example_quotes(ev: ExampleEvent, data: bytes | bytearray) -> int:
    """The quotes an example's bytes hold if nothing is repeated or unknown (-1: cannot say, scan it)."""
    # 10 required keys, 6 string values, the label if a string, names, then the optional fields.
    p = ev.prediction
    n = 32 + 2 * len(ev.features) + (2 * len(p) if type(p) is dict else 0) + (2 if type(ev.label) is str else 0)
    features = ev.features
    if (
        ev.label_source is not None
        and ev.prediction_source is not None
        and ev.label_event_id is not None
        and ev.label_time is not None
    ):  # a labeled example, as joined: nothing optional is missing
        return n + 2 * _SOURCE_QUOTES + 4 + 2
    if ev.label_event_id is None and ev.label_time is None and ev.label_source is None:
        # Unlabeled, as this package writes it: the null fields in a row, found at once (each is
        # then written as null, which is what the per-field finds below would conclude).
        if (
            "label_event_id" not in features
            and "label_time" not in features
            and "label_source" not in features
            and "prediction_source" not in features
        ):
            if ev.prediction_source is not None:
                if _LABEL_NULLS in data:
                    return n + _SOURCE_QUOTES + 6
            elif _ALL_NULLS in data:
                return n + 8
    optional = (
        _SOURCE_QUOTES if ev.prediction_source is not None else _null(data, _PREDICTION_SOURCE, features),
        4 if ev.label_event_id is not None else _null(data, _LABEL_EVENT_ID, features),
        2 if ev.label_time is not None else _null(data, _LABEL_TIME, features),
        _SOURCE_QUOTES if ev.label_source is not None else _null(data, _LABEL_SOURCE, features),
    )
    return -1 if -1 in optional else n + sum(optional)


_PREDICTION_SOURCE, _LABEL_EVENT_ID = _nulls("prediction_source"), _nulls("label_event_id")
_LABEL_TIME, _LABEL_SOURCE = _nulls("label_time"), _nulls("label_source")
_LABEL_NULLS = b'"label_event_id":null,"label_time":null,"label_source":null'
_ALL_NULLS = b'"prediction_source":null,' + _LABEL_NULLS


def string_values(ev: PredictionEvent | ExampleEvent) -> int:
    """The quotes of the string feature values (v2: categories, texts), which the counts above leave out."""
    return 2 * sum(1 for v in ev.features.values() if type(v) is str)


STRING_VALUES: dict[type, Callable[[Any], int]] = {PredictionEvent: string_values, ExampleEvent: string_values}

QUOTE_COUNTS: dict[type, Callable[[Any, bytes | bytearray], int]] = {
    PredictionEvent: prediction_quotes,
    LabelEvent: label_quotes,
    ExampleEvent: example_quotes,
}
