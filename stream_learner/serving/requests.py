"""A ``POST /predict`` body: its shape, the work it asks for, and a total parser.

Whatever the bytes are, :func:`parse` returns the requests or raises an
:class:`~stream_learner.errors.EventError` that names the problem (the node
answers it as a 400); nothing here can raise anything else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from ..errors import EventError
from ..events import Codec, Features, Ident
from .http import MAX_BATCH


class PredictRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One prediction request: the features, and the caller's request id if it has one."""

    features: Features
    request_id: Ident | None = None


class Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ``POST /predict`` body: one request, or ``instances`` served by one model version."""

    features: Features | None = None
    request_id: Ident | None = None
    instances: list[PredictRequest] | None = None


_BODY: Codec[Body] = Codec(Body, 1 << 62)  # the node checks the size itself, before reading the body


def work_of(requests: Sequence[PredictRequest], n_features: int) -> int:
    """What a request asks for: the feature values it sends, or the model's features per instance if more."""
    sent = sum(len(r.features) for r in requests)
    return max(sent, len(requests) * n_features)


_PATH = re.compile(r" - at `(\$[^`]*)`$")


def parse(body: bytes, max_batch: int = MAX_BATCH) -> tuple[bool, list[PredictRequest]]:
    """A request body as (is it a batch, its requests); EventError naming the problem.

    Total: whatever the bytes are, it returns or raises :class:`EventError`
    (the event decoder refuses deep nesting as ``too_deep``; should anything
    in it still raise ``RecursionError``, the problem is named from
    msgspec's own message).

    >>> parse(b'{"features": {"x": 1.5}, "request_id": "r1"}')
    (False, [PredictRequest(features={'x': 1.5}, request_id='r1')])
    >>> parse(b'{"features": {"x": true}}')
    Traceback (most recent call last):
    ...
    stream_learner.errors.EventError: $.features.x: expected `float | str | array | null`, got `bool`
    >>> parse(b'{"features": {"x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}")
    Traceback (most recent call last):
    ...
    stream_learner.errors.EventError: $: arrays and objects nest deeper than 64 levels
    """
    try:
        parsed = _BODY.decode(body)
    except RecursionError:
        raise _too_deep(body) from None
    except EventError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything else the decoder raises is still the body's fault
        raise EventError("malformed_json", "$", f"cannot decode the body: {type(exc).__name__}") from None
    if parsed.instances is not None:
        if parsed.features is not None or parsed.request_id is not None:
            raise EventError("invalid_value", "$", "give `instances`, or `features` (and `request_id`), not both")
        if len(parsed.instances) > max_batch:
            raise EventError("invalid_value", "$.instances", f"a batch holds at most {max_batch} instances")
        return True, parsed.instances
    if parsed.features is None:
        raise EventError("missing_field", "$.features", "missing required field")
    return False, [PredictRequest(features=parsed.features, request_id=parsed.request_id)]


def _too_deep(body: bytes) -> EventError:
    """The error of a body the event decoder's error path cannot explain for its depth: msgspec's own."""
    try:
        msgspec.json.decode(body, type=Body)
    except msgspec.ValidationError as exc:
        m = _PATH.search(str(exc))
        text = str(exc)[: m.start()] if m else str(exc)
        return EventError("wrong_type", m.group(1) if m else "$", f"nests too deeply: {text}")
    except (msgspec.DecodeError, RecursionError):
        pass
    return EventError("malformed_json", "$", "the body nests too deeply")
