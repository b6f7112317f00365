"""Typed events of the wire contract, and their fast encoders and decoders.

The JSON Schema files in ``schemas/`` are the contract other languages read;
the ``msgspec`` structs below are the same contract in Python, and the tests
prove the two agree. The hot path decodes with ``msgspec`` (about a
microsecond for a 16-feature prediction), never with ``jsonschema``.

Feature values are numbers or ``null``:

* a string, boolean, ``NaN`` or ``Infinity`` is refused: the whole event is
  rejected with an :class:`~stream_learner.errors.EventError` naming the
  feature, and the consumer sends it to the dead-letter topic;
* ``null`` or an absent feature is *missing*: the featurizer imputes it and
  counts it;
* a feature the model does not know is *unknown*: kept in the example for
  lineage, ignored by the model, counted.

Top-level fields that this version does not know are ignored, so a v1 reader
accepts events from a newer writer that only added fields.

>>> ev = PredictionEvent(event_id="e1", request_id="r1", model="churn",
...                      model_version="3", event_time=1_700_000_000_000,
...                      features={"age": 41.0, "plan": None},
...                      prediction={"yes": 0.8, "no": 0.2})
>>> PREDICTION.decode(encode(ev)) == ev
True
>>> PREDICTION.decode(b'{"event_id": "e1"}')
Traceback (most recent call last):
...
stream_learner.errors.EventError: $.request_id: missing required field
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from .errors import EventError

# Largest finite double: bounding floats by it refuses inf (1e400 parses to
# inf) and NaN (every comparison with NaN is false).
_FMAX = 1.7976931348623157e308
MAX_FEATURES = 4096
MAX_CLASSES = 1024
#: Default limit on an encoded event's size; larger messages are refused
#: before decoding so a huge payload cannot exhaust memory.
DEFAULT_MAX_EVENT_BYTES = 1 << 20

Finite = Annotated[float, Meta(ge=-_FMAX, le=_FMAX)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Ident = Annotated[str, Meta(min_length=1, max_length=256)]
Name = Annotated[str, Meta(min_length=1, max_length=256)]
Version = Annotated[str, Meta(min_length=1, max_length=128)]
#: Milliseconds since the Unix epoch; 2**53 keeps it exact in every JSON reader.
EventTime = Annotated[int, Meta(ge=0, le=2**53)]
Features = Annotated[dict[Name, Finite | None], Meta(max_length=MAX_FEATURES)]
ClassProbs = Annotated[dict[Name, Probability], Meta(min_length=1, max_length=MAX_CLASSES)]
#: A regression value, or class name -> probability for a classifier.
Prediction = Finite | ClassProbs
#: A class name, or a number (a regression target, or a class written as a
#: number: the class of label ``1`` is ``"1"``, see :func:`class_name`).
Label = Name | Finite
Offset = Annotated[int, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]


class PredictionEvent(Struct, frozen=True, kw_only=True):
    """What an application served for one request (schema ``prediction.v1``)."""

    event_id: Ident
    request_id: Ident
    model: Name
    model_version: Version
    event_time: EventTime
    features: Features
    prediction: Prediction


class LabelEvent(Struct, frozen=True, kw_only=True):
    """The truth for one request, arriving later or never (schema ``label.v1``)."""

    event_id: Ident
    request_id: Ident
    event_time: EventTime
    label: Label
    model: Name | None = None


class Source(Struct, frozen=True):
    """Where an input record was read: its lineage."""

    topic: Name
    partition: Offset
    offset: Offset


ExampleKind = Literal["labeled", "unlabeled", "late"]


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


class WeightsInfo(Struct, frozen=True, kw_only=True):
    """How a checkpoint's safetensors bytes are laid out on the model topic.

    ``chunk_offsets[i]`` is the offset of chunk ``i`` in the partition that
    holds the manifest (chunks are produced, and acknowledged, before it).
    """

    format: Literal["safetensors"]
    size: Count
    chunks: Annotated[int, Meta(ge=1)]
    sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    chunk_offsets: list[Annotated[int, Meta(ge=0)]] = []


class Signature(Struct, frozen=True, kw_only=True):
    """An Ed25519 signature over the manifest encoded without its signature."""

    alg: Literal["ed25519"]
    key_id: Ident
    value: Annotated[str, Meta(min_length=1, max_length=256)]


class VariantInfo(Struct, frozen=True, kw_only=True):
    """What a serving variant is (``CheckpointManifest.variant``; see :mod:`stream_learner.optimize`).

    ``name``: ``int8``, ``pruned``, ``sparse`` or ``student``; the parent is
    version ``parent_version`` of ``parent_model``, whose weights have
    ``parent_sha256``; ``recipe``: how it was made; ``measured``: its
    accuracy and agreement with the parent on held-out examples, parameter
    counts, bytes and latencies next to the parent's.
    """

    name: Name
    parent_model: Name
    parent_version: Annotated[int, Meta(ge=1)]
    parent_sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    recipe: dict[Name, Any]
    measured: dict[Name, Finite]


class CheckpointManifest(Struct, frozen=True, kw_only=True):
    """A model version published to the model topic (schema ``manifest.v1``).

    ``variant`` is optional (default ``null``: an ordinary checkpoint); a
    manifest without it signs and verifies exactly as before the field existed.
    """

    model: Name
    version: Annotated[int, Meta(ge=1)]
    parent: Annotated[int, Meta(ge=1)] | None
    created_at: EventTime
    input_offsets: list[Source]
    counts: dict[Name, Count]
    metrics: dict[Name, Finite]
    drift_state: dict[Name, Any]
    feature_spec: list[Name]
    architecture: dict[Name, Any]
    weights: WeightsInfo
    signature: Signature | None = None
    variant: VariantInfo | None = None


DriftKind = Literal["warning", "drift", "status"]


class DriftEvent(Struct, frozen=True, kw_only=True):
    """A detector's warning or drift, or a periodic status (schema ``drift.v1``)."""

    event_id: Ident
    model: Name
    event_time: EventTime
    kind: DriftKind
    detector: Name
    signal: Name
    model_version: Annotated[int, Meta(ge=0)] | None = None
    value: Finite | None = None
    actions: list[Name] = []
    details: dict[Name, Any] = {}


E = TypeVar("E", bound=Struct)

_encoder = msgspec.json.Encoder()


def encode(event: Struct) -> bytes:
    """Encode any event as compact JSON bytes (the Kafka record value)."""
    return _encoder.encode(event)


def new_event_id() -> str:
    """A fresh random event id (UUID4 hex)."""
    return uuid.uuid4().hex


def now_ms() -> int:
    """The current wall-clock time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def class_name(label: str | float) -> str:
    """The class a label or probability key names, as a string.

    Numbers written for classes are normalised so that ``1``, ``1.0`` and
    ``"1"`` are the same class.

    >>> class_name(1.0), class_name("yes"), class_name(2.5)
    ('1', 'yes', '2.5')
    """
    if isinstance(label, str):
        return label
    return str(int(label)) if float(label).is_integer() else repr(float(label))


class Codec(Generic[E]):
    """Decoder of one event type that explains every refusal.

    ``decode`` raises :class:`EventError` with the JSON path of the offending
    field and a short ``kind``: ``oversized``, ``malformed_json``,
    ``non_finite``, ``missing_field``, ``wrong_type`` or ``invalid_value``.
    """

    def __init__(self, event_type: type[E], max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.event_type = event_type
        self.max_bytes = max_bytes
        self._decoder = msgspec.json.Decoder(event_type)

    def decode(self, data: bytes | bytearray | memoryview | None) -> E:
        """Decode one record value, or raise :class:`EventError`."""
        if data is None:
            raise EventError("malformed_json", "$", "empty record value (tombstone)")
        if len(data) > self.max_bytes:
            raise EventError("oversized", "$", f"message is {len(data)} bytes, limit is {self.max_bytes}")
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise _explain_validation(str(exc), data) from None
        except msgspec.DecodeError as exc:
            raise _explain_malformed(str(exc), data) from None

    def convert(self, obj: dict[str, Any]) -> E:
        """Validate Python values (as an SDK caller passes them) into an event."""
        try:
            return msgspec.convert(obj, self.event_type)
        except msgspec.ValidationError as exc:
            # json.dumps writes NaN/Infinity tokens, which the key resolver reads back.
            raise _explain_validation(str(exc), json.dumps(obj, default=repr).encode()) from None


PREDICTION: Codec[PredictionEvent] = Codec(PredictionEvent)
LABEL: Codec[LabelEvent] = Codec(LabelEvent)
EXAMPLE: Codec[ExampleEvent] = Codec(ExampleEvent)
MANIFEST: Codec[CheckpointManifest] = Codec(CheckpointManifest)
DRIFT: Codec[DriftEvent] = Codec(DriftEvent)

# The error path below may be slow: it runs only for refused events, and turns msgspec's terse message into one that names the
# field (msgspec writes dict keys as ``[...]``).
_AT = re.compile(r" - at `(\$[^`]*)`$")
_AT_KEY = re.compile(r" - at `key` in `(\$[^`]*)`$")
_BOUND = re.compile(r"^Expected `\w+` (<=|>=|<|>) (\S+)$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`")
_GOT = re.compile(r"^Expected `[^`]+`, got `(\w+)`")
_JSON_TYPES = {"str": str, "bool": bool, "null": type(None), "int": int, "float": float,
               "array": list, "object": dict}


def _explain_validation(msg: str, data: bytes | bytearray | memoryview) -> EventError:
    if m := _AT_KEY.search(msg):
        text = msg[: m.start()]
        return EventError("invalid_value", m.group(1), f"a key is invalid: {text[0].lower()}{text[1:]}")
    m = _AT.search(msg)
    path = m.group(1) if m else "$"
    text = msg[: m.start()] if m else msg
    if missing := _MISSING.match(text):
        return EventError("missing_field", f"{path}.{missing.group(1)}", "missing required field")
    culprit: Callable[[Any], bool] | None
    if text == "Number out of range":
        kind, text, culprit = "non_finite", "number is too large for a finite double", _is_huge
    elif got := _GOT.match(text):
        kind, culprit = "wrong_type", _is_type(got.group(1))
    elif bound := _BOUND.match(text):
        kind, culprit = "invalid_value", _breaks_bound(bound.group(1), float(bound.group(2)))
    else:
        kind, culprit = "invalid_value", None
    if "[...]" in path:
        path = _resolve_keys(path, data, culprit)
    return EventError(kind, path, text[0].lower() + text[1:] if text else "invalid")


def _is_huge(value: Any) -> bool:
    return isinstance(value, float) and (not math.isfinite(value) or abs(value) > _FMAX)


def _is_type(name: str) -> Callable[[Any], bool]:
    typ = _JSON_TYPES.get(name)
    return lambda value: typ is not None and type(value) is typ


def _breaks_bound(op: str, bound: float) -> Callable[[Any], bool]:
    holds = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__, ">": float.__gt__}[op]
    return lambda value: (
        isinstance(value, (int, float)) and not isinstance(value, bool) and not holds(float(value), bound)
    )


def _resolve_keys(path: str, data: bytes | bytearray | memoryview,
                  culprit: Callable[[Any], bool] | None) -> str:
    """Replace msgspec's ``[...]`` with the first key whose value is at fault."""
    try:
        obj: Any = json.loads(bytes(data))
    except ValueError:
        return path
    out = "$"
    for part in re.findall(r"\.(\w+)|\[(\d+)\]|(\[\.\.\.\])", path[1:]):
        name, index, wildcard = part
        if name and isinstance(obj, dict):
            out, obj = f"{out}.{name}", obj.get(name)
        elif index and isinstance(obj, list):
            out, obj = f"{out}[{index}]", obj[int(index)]
        elif wildcard and isinstance(obj, dict):
            key = next((k for k, v in obj.items() if culprit and culprit(v)), None)
            if key is None:
                return out + "[...]"
            out, obj = f"{out}.{key}", obj[key]
        else:
            return path
    return out


def _explain_malformed(msg: str, data: bytes | bytearray | memoryview) -> EventError:
    # Python's json accepts the NaN/Infinity tokens that standard JSON (and
    # msgspec) refuse; if it parses, name the field holding the non-finite value.
    try:
        obj = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError):
        return EventError("malformed_json", "$", msg.removeprefix("JSON is malformed: "))
    where = _find_non_finite(obj, "$")
    if where is not None:
        return EventError("non_finite", where, "NaN and Infinity are not numbers in JSON")
    return EventError("malformed_json", "$", msg.removeprefix("JSON is malformed: "))


def _find_non_finite(obj: Any, path: str) -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path
    items: Iterable[tuple[Any, Any]]
    if isinstance(obj, dict):
        items = obj.items()
        fmt = "{}.{}"
    elif isinstance(obj, list):
        items = enumerate(obj)
        fmt = "{}[{}]"
    else:
        return None
    for key, value in items:
        found = _find_non_finite(value, fmt.format(path, key))
        if found:
            return found
    return None
