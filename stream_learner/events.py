"""Typed events of the wire contract, and their fast encoders and decoders.

The JSON Schema files in ``schemas/`` are the contract other languages read;
the ``msgspec`` structs below are the same contract in Python, and the tests
prove the two agree. The hot path decodes with ``msgspec`` (about a
microsecond for a 16-feature prediction), never with ``jsonschema``.

Feature values (``prediction.v2``, ``example.v2``) are numbers, strings
(a category, or a text), arrays of numbers (a vector) or ``null``; a v1
event (numbers and ``null`` only) is a v2 event:

* a boolean, an object, an array holding anything but numbers, ``NaN`` or
  ``Infinity`` is refused: the whole event is rejected with an
  :class:`~stream_learner.errors.EventError` naming the feature, and the
  consumer sends it to the dead-letter topic;
* whether a value fits the model (a number for a numeric feature, a vector
  of the declared length, a category of the vocabulary, a text short enough)
  is the model's to say: its featurizer refuses the example, naming the
  feature, and the trainer dead-letters it (:mod:`stream_learner.learn.inputs`);
* ``null`` or an absent feature is *missing*: the featurizer imputes it and
  counts it;
* a feature the model does not know is *unknown*: kept in the example for
  lineage, ignored by the model, counted.

The v1 shapes stay in :mod:`stream_learner.events_v1`, from which the v1
schema files are generated.

Top-level fields that this version does not know are ignored, so a v1 reader
accepts events from a newer writer that only added fields.

Decoding is total: whatever the bytes, :meth:`Codec.decode` returns an event
or raises :class:`~stream_learner.errors.EventError`, never anything else, so
no record can stop a role. Two refusals protect the readers:

* an event nesting arrays and objects deeper than :data:`MAX_DEPTH` levels is
  refused (``too_deep``): parsers recurse per level, and Python's default
  recursion limit (about 1,000) would otherwise decide, by the caller's
  stack depth, what is accepted;
* a key given twice in an object the reader reads (the event itself, its
  ``features``, its ``prediction``, a source) is refused
  (``duplicate_key``): JSON parsers disagree on which value wins, and a
  ``request_id`` or ``event_time`` given twice is ambiguous. Repeats inside
  fields this version ignores are not looked at.

Both cost almost nothing on a normal event: after msgspec decodes it, one
count of its quote characters proves that the bytes hold exactly the strings
the decoded event holds (no key twice, no unknown field, so nothing nested
deeper than the event's own shape). Only an event that fails that count (it
has unknown fields, escaped quotes or ``null`` for an optional field) is
scanned precisely: its nesting depth, then its keys.

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
#: At most this many features per event, and classes per prediction (both ``invalid_value`` beyond).
MAX_FEATURES = 4096
MAX_CLASSES = 1024
#: The deepest nesting of arrays and objects an event may have (the event's own object is level 1;
#: a prediction's class probabilities are level 2, as are an example's sources).
MAX_DEPTH = 64
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
#: Most characters of a string feature value (a category or a text), and numbers in a vector value.
MAX_TEXT_CHARS = 1_000_000
MAX_VECTOR = 65_536
Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
Vector = Annotated[list[Finite], Meta(max_length=MAX_VECTOR)]
#: One feature value: a number, a string (a category or a text), a vector of numbers, or missing.
FeatureValue = Finite | Text | Vector | None
Features = Annotated[dict[Name, FeatureValue], Meta(max_length=MAX_FEATURES)]
ClassProbs = Annotated[dict[Name, Probability], Meta(min_length=1, max_length=MAX_CLASSES)]
#: A regression value, or class name -> probability for a classifier.
Prediction = Finite | ClassProbs
#: A class name, or a number (a regression target, or a class written as a
#: number: the class of label ``1`` is ``"1"``, see :func:`class_name`).
Label = Name | Finite
Offset = Annotated[int, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]


class PredictionEvent(Struct, frozen=True, kw_only=True):
    """What an application served for one request (schema ``prediction.v2``; a v1 event is one)."""

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
    """A prediction joined with its label, or closed without one (schema ``example.v2``; a v1 example is one).

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


class WeightsLayout(Struct, frozen=True, kw_only=True):
    """How a checkpoint's tensors relate to a frozen base, and their precision (``CheckpointManifest.layout``).

    ``dtype``: the precision of the published floating model tensors (a node
    computes in float32 all the same). ``base_sha256``: the SHA-256 of the
    frozen base file the model was learned on (``null``: no base).
    ``delta``: the weights hold only the tensors that learn (and the
    statistics); the frozen ones are the base's, which the node must hold
    (``serving_base_weights``) or refuse the version. A full checkpoint
    (``delta`` false) holds every tensor and needs no base.
    """

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    base_sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")] | None = None
    delta: bool = False


class CheckpointManifest(Struct, frozen=True, kw_only=True):
    """A model version published to the model topic (schema ``manifest.v1``).

    ``variant`` and ``layout`` are optional (default ``null``: an ordinary
    checkpoint, float32, no base); a manifest without them signs and
    verifies exactly as before the fields existed.
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
    layout: WeightsLayout | None = None


VersionNumber = Annotated[int, Meta(ge=1)]
#: Previous versions a registry record keeps per alias.
REGISTRY_HISTORY_MAX = 20


class RegistryRecord(Struct, frozen=True, kw_only=True):
    """The registry state of one model after one change (schema ``registry.v1``).

    See :mod:`stream_learner.checkpoint.registry` for how it is signed, ordered and found.

    ``aliases`` maps an alias to a version; ``pin`` is the version every node
    serves whatever its alias (``None``: no pin); ``history`` holds each
    alias's previous versions, oldest first; ``log_end`` is the end offset of
    partition 0 read before writing; ``change`` says what this record did.
    """

    schema: Literal["registry.v1"] = "registry.v1"
    model: Name
    seq: Annotated[int, Meta(ge=1)]
    log_end: Annotated[int, Meta(ge=0)]
    created_at: EventTime
    aliases: Annotated[dict[Name, VersionNumber], Meta(max_length=64)] = {}
    pin: VersionNumber | None = None
    history: Annotated[
        dict[Name, Annotated[list[VersionNumber], Meta(max_length=REGISTRY_HISTORY_MAX)]], Meta(max_length=64)
    ] = {}
    change: Annotated[str, Meta(max_length=1024)] = ""
    signature: Signature | None = None


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
    field and a short ``kind``: ``oversized``, ``too_deep``,
    ``malformed_json``, ``non_finite``, ``missing_field``, ``wrong_type``,
    ``invalid_value``, ``duplicate_key`` or ``undecodable`` (the decoder
    failed in a way nobody foresaw; the message names the exception). It
    raises nothing else, whatever the bytes.

    The depth limit and the refusal of repeated keys apply in full to the
    wire events (predictions, labels, examples), whose shape gives the fast
    proof of the module docstring. Other types (manifests, drift events, a
    caller's own struct) are not scanned when msgspec accepts them (that
    would parse every record twice); they are total all the same (too deep
    for the parser is ``too_deep``), and a refusal names ``too_deep`` first.
    """

    def __init__(
        self, event_type: type[E], max_bytes: int = DEFAULT_MAX_EVENT_BYTES, max_depth: int = MAX_DEPTH
    ) -> None:
        self.event_type = event_type
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self._decoder = msgspec.json.Decoder(event_type)
        self._quotes = _QUOTE_COUNTS.get(event_type)
        self._strings = _STRING_VALUES.get(event_type)
        self._fields = frozenset(event_type.__struct_fields__)

    def decode(self, data: bytes | bytearray | memoryview | None) -> E:
        """Decode one record value, or raise :class:`EventError`."""
        if data is None:
            raise EventError("malformed_json", "$", "empty record value (tombstone)")
        if len(data) > self.max_bytes:
            raise EventError("oversized", "$", f"message is {len(data)} bytes, limit is {self.max_bytes}")
        try:
            event = self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise self._refusal(bytes(data), _explain_validation, str(exc), "invalid_value") from None
        except msgspec.DecodeError as exc:
            raise self._refusal(bytes(data), _explain_malformed, str(exc), "malformed_json") from None
        except RecursionError:
            raise _too_deep(self.max_depth) from None
        except Exception as exc:  # noqa: BLE001 - no record may stop a role
            raise _undecodable(exc) from None
        # The fast proof (see the module docstring); anything else is scanned.
        quotes = self._quotes
        if quotes is not None:
            raw = bytes(data) if isinstance(data, memoryview) else data  # a memoryview has no count()
            found = raw.count(b'"')
            expected = quotes(event, raw)
            # String feature values (categories, texts) are counted only when the count is off: an
            # event of numbers alone pays nothing for them.
            if found != expected and (
                self._strings is None or expected < 0 or found != expected + self._strings(event)
            ):
                self._scan(raw)
        return event

    def convert(self, obj: dict[str, Any]) -> E:
        """Validate Python values (as an SDK caller passes them) into an event."""
        try:
            return msgspec.convert(obj, self.event_type)
        except msgspec.ValidationError as exc:
            msg = str(exc)
        except RecursionError:
            raise _too_deep(self.max_depth) from None
        except Exception as exc:  # noqa: BLE001 - the caller gets an EventError, whatever it passed
            raise _undecodable(exc) from None
        try:
            # json.dumps writes NaN/Infinity tokens, which the key resolver reads back.
            as_json = json.dumps(obj, default=repr).encode()
        except Exception:  # noqa: BLE001 - nested too deep, or a cycle: explain without it
            as_json = b"null"
        raise self._refusal(as_json, _explain_validation, msg, "invalid_value") from None

    def _refusal(
        self, data: bytes | bytearray, explain: Callable[[str, bytes | bytearray], EventError], msg: str, kind: str
    ) -> EventError:
        """Why ``data`` was refused: ``too_deep`` first (explaining parses it again), else what
        ``explain`` makes of msgspec's message; never an exception of its own."""
        if nesting_exceeds(data, self.max_depth):
            return _too_deep(self.max_depth)
        try:
            return explain(msg, data)
        except Exception:  # noqa: BLE001 - msgspec's own words are still a reason
            return EventError(kind, "$", msg)

    def _scan(self, data: bytes | bytearray) -> None:
        """The precise checks of an event msgspec accepted: its depth, then repeated keys."""
        if nesting_exceeds(data, self.max_depth):
            raise _too_deep(self.max_depth)
        try:
            # Numbers are not needed: len() keeps huge integers from Python's 4,300-digit limit.
            doc = json.loads(data, object_pairs_hook=_Object, parse_int=len, parse_float=len, parse_constant=len)
        except Exception as exc:  # noqa: BLE001 - msgspec accepted it; say why Python's json did not
            raise EventError("malformed_json", "$", f"not valid JSON to a strict reader: {exc}") from None
        if type(doc) is _Object:
            field = _repeated(doc, self._fields)
            if field is not None:
                raise EventError(
                    "duplicate_key", field, "the key is given more than once (which value is meant is ambiguous)"
                )


# -- the precise checks ------------------------------------------------------------------

_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
# Depth does not care which kind a bracket is (pairing them is the parser's job): braces become brackets.
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def nesting_exceeds(data: bytes | bytearray, limit: int) -> bool:
    """True if the JSON text ``data`` nests arrays and objects deeper than ``limit`` levels.

    Brackets inside strings do not count. Linear in C, at most ``limit``
    passes: strings are cut out (escaped backslashes and quotes first),
    everything but brackets is deleted and braces become brackets, then each
    pass removes the innermost pairs (one level; ``bytes.replace`` never
    pairs what its own removals bring together), so ``limit`` passes empty a
    text no deeper than ``limit``; a run of openers longer than the levels
    left ends it early (a plain deep nest costs one search). A text whose
    brackets do not pair up is malformed, not deep: False, and the parser
    says what is wrong.

    >>> nesting_exceeds(b'{"a": [[1], {"b": "[[[["}]}', 3), nesting_exceeds(b'[{"a": [[]]}]', 3)
    (False, True)
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # fewer openers than levels: cannot be deeper
    text = bytes(data).replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(text.split(b'"')[::2]).translate(_ONE_KIND, _NOT_BRACKETS)
    for removed in range(limit):
        if not brackets:
            return False
        if b"[" * (limit + 1 - removed) in brackets:
            return True  # that many openers in a row are that many more levels: no need to peel them
        inner_removed = brackets.replace(b"[]", b"")
        if len(inner_removed) == len(brackets):
            return False
        brackets = inner_removed
    return bool(brackets)


class _Object(dict[str, Any]):
    """A JSON object that remembers the keys it was given more than once (``object_pairs_hook``)."""

    __slots__ = ("repeated",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.repeated: list[str] = []
        if len(self) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.repeated.append(key)
                seen.add(key)


def _repeated(doc: _Object, fields: frozenset[str]) -> str | None:
    """The path of the first key given twice where the reader looks: a field of the event, or
    any key of an object that is a field's value (features, prediction, a source)."""
    for key in doc.repeated:
        if key in fields:
            return f"$.{key}"
    for key, value in doc.items():
        if key in fields and type(value) is _Object and value.repeated:
            return f"$.{key}.{value.repeated[0]}"
    return None


def _too_deep(limit: int) -> EventError:
    return EventError("too_deep", "$", f"arrays and objects nest deeper than {limit} levels")


def _undecodable(exc: BaseException) -> EventError:
    return EventError("undecodable", "$", f"the decoder failed: {type(exc).__name__}: {exc}"[:1000])


# -- the fast proof: how many quote characters the decoded event accounts for --------------
#
# Every string of a JSON text (key or value) is two quote characters, and a
# quote inside a string is escaped (one more). So the bytes hold at least
# twice as many quotes as the decoded event has strings (its keys, string
# values, feature and class names, string feature values), and exactly twice as many only if no key
# is given twice, no field is unknown and no string holds an escaped quote.
# An optional field that decoded to None may be absent or written as null:
# a ``"name":null`` in the bytes is taken as the field (if it is not the
# field, it is inside a string, hence escaped, or a key of an unknown object,
# itself a string too much: either way the count stays above, never below,
# and no repeat can hide behind it). A feature of that name could be the
# one exception (features may be null), so such an event is always scanned.


def _nulls(name: str) -> tuple[str, bytes, bytes]:
    return name, f'"{name}":null'.encode(), f'"{name}": null'.encode()


def _null(data: bytes | bytearray, field: tuple[str, bytes, bytes], features: dict[str, Any] | None = None) -> int:
    """Quotes for an optional field (from :func:`_nulls`) that decoded to None: 2 if it is
    written as null, else 0; -1 (scan) when a feature has the field's name."""
    if features is not None and field[0] in features:
        return -1
    return 2 if data.find(field[1]) >= 0 or data.find(field[2]) >= 0 else 0


def _prediction_quotes(ev: PredictionEvent, data: bytes | bytearray) -> int:
    # 7 keys, 4 string values, the feature names, the class names.
    p = ev.prediction
    if p.__class__ is dict:
        return 22 + 2 * (len(ev.features) + len(p))
    return 22 + 2 * len(ev.features)


def _label_quotes(ev: LabelEvent, data: bytes | bytearray) -> int:
    # 4 required keys, 2 string values, a class name, the model (key and value).
    n = 12 + (2 if type(ev.label) is str else 0)
    return n + 4 if ev.model is not None else n + _null(data, _MODEL)


_MODEL = _nulls("model")


_SOURCE_QUOTES = 10  # the field's key, three keys, the topic


def _example_quotes(ev: ExampleEvent, data: bytes | bytearray) -> int:
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
    optional = (
        _SOURCE_QUOTES if ev.prediction_source is not None else _null(data, _PREDICTION_SOURCE, features),
        4 if ev.label_event_id is not None else _null(data, _LABEL_EVENT_ID, features),
        2 if ev.label_time is not None else _null(data, _LABEL_TIME, features),
        _SOURCE_QUOTES if ev.label_source is not None else _null(data, _LABEL_SOURCE, features),
    )
    return -1 if -1 in optional else n + sum(optional)


_PREDICTION_SOURCE, _LABEL_EVENT_ID = _nulls("prediction_source"), _nulls("label_event_id")
_LABEL_TIME, _LABEL_SOURCE = _nulls("label_time"), _nulls("label_source")


def _string_values(ev: PredictionEvent | ExampleEvent) -> int:
    """The quotes of the string feature values (v2: categories, texts), which the counts above leave out."""
    return 2 * sum(1 for v in ev.features.values() if type(v) is str)


_STRING_VALUES: dict[type, Callable[[Any], int]] = {PredictionEvent: _string_values, ExampleEvent: _string_values}

_QUOTE_COUNTS: dict[type, Callable[[Any, bytes | bytearray], int]] = {
    PredictionEvent: _prediction_quotes,
    LabelEvent: _label_quotes,
    ExampleEvent: _example_quotes,
}

PREDICTION: Codec[PredictionEvent] = Codec(PredictionEvent)
LABEL: Codec[LabelEvent] = Codec(LabelEvent)
EXAMPLE: Codec[ExampleEvent] = Codec(ExampleEvent)
MANIFEST: Codec[CheckpointManifest] = Codec(CheckpointManifest)
DRIFT: Codec[DriftEvent] = Codec(DriftEvent)
#: Registry records are small: one larger than this is refused unread.
REGISTRY: Codec[RegistryRecord] = Codec(RegistryRecord, 64 * 1024)

# The error path below may be slow: it runs only for refused events, and turns msgspec's terse
# message into one that names the field (msgspec writes dict keys as ``[...]``).
_AT = re.compile(r" - at `(\$[^`]*)`$")
_AT_KEY = re.compile(r" - at `key` in `(\$[^`]*)`$")
_BOUND = re.compile(r"^Expected `\w+` (<=|>=|<|>) (\S+)$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`")
_GOT = re.compile(r"^Expected `[^`]+`, got `(\w+)`")
_JSON_TYPES = {"str": str, "bool": bool, "null": type(None), "int": int, "float": float, "array": list, "object": dict}


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


def _resolve_keys(path: str, data: bytes | bytearray | memoryview, culprit: Callable[[Any], bool] | None) -> str:
    """Replace msgspec's ``[...]`` with the first key whose value is at fault."""
    try:
        obj: Any = json.loads(bytes(data))
    except Exception:  # noqa: BLE001 - not parseable by Python (too deep, huge number): keep msgspec's path
        return path
    parts = re.findall(r"\.(\w+)|\[(\d+)\]|(\[\.\.\.\])", path[1:])
    return _walk("$", obj, parts, culprit) or path


def _walk(out: str, obj: Any, parts: list[tuple[str, str, str]], culprit: Callable[[Any], bool] | None) -> str | None:
    """The path along ``parts`` to a value ``culprit`` blames, a wildcard taking the first key that leads to
    one (a vector's element: ``$.features[...][1]`` is ``$.features.emb[1]``); the wildcard kept if none does."""
    for at, (name, index, wildcard) in enumerate(parts):
        if name and isinstance(obj, dict):
            out, obj = f"{out}.{name}", obj.get(name)
        elif index and isinstance(obj, list) and int(index) < len(obj):
            out, obj = f"{out}[{index}]", obj[int(index)]
        elif wildcard and isinstance(obj, dict):
            for key, value in obj.items():
                found = _walk(f"{out}.{key}", value, parts[at + 1 :], culprit)
                if found is not None and "[...]" not in found:
                    return found
            return out + "[...]" + "".join(f".{n}" if n else f"[{i}]" if i else "[...]" for n, i, _ in parts[at + 1 :])
        else:
            return None
    return out if culprit is None or culprit(obj) else None


def _explain_malformed(msg: str, data: bytes | bytearray | memoryview) -> EventError:
    # Python's json accepts the NaN/Infinity tokens that standard JSON (and
    # msgspec) refuse; if it parses, name the field holding the non-finite value.
    try:
        obj = json.loads(bytes(data))
    except Exception:  # noqa: BLE001 - malformed for Python too (or too deep for it to say)
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
