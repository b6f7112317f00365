"""The wire structs: every event's fields, their types and bounds, and the encoder.

The JSON Schema files in ``schemas/`` are generated from these structs
(:mod:`stream_learner.schemas`). The feature values of ``prediction.v2`` and
``example.v2`` (:data:`FeatureValue`) are a number, a string (a category or a
text), a vector of numbers or missing; the v1 shapes, numbers only, are in
:mod:`stream_learner.events_v1`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# Largest finite double: bounding floats by it refuses inf (1e400 parses to
# inf) and NaN (every comparison with NaN is false).
FINITE_MAX = 1.7976931348623157e308
#: At most this many features per event, and classes per prediction (both ``invalid_value`` beyond).
MAX_FEATURES = 4096
MAX_CLASSES = 1024
Finite = Annotated[float, Meta(ge=-FINITE_MAX, le=FINITE_MAX)]
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


#: The ``format`` of an example batch (schema ``example-batch.v1``, :mod:`stream_learner.events.batch`).
EXAMPLE_BATCH_FORMAT = "stream-learner.example-batch"


class ExampleBatch(Struct, frozen=True, kw_only=True):
    """Several joined examples in one record of the examples topic (schema ``example-batch.v1``).

    The joiner writes these with ``examples_format = "batch"``: one record per
    examples-topic partition and cycle, its examples in the order the JSON
    format would have sent them, each exactly the ``example.v2`` object a
    one-example record holds. The record carries the header
    ``sl-format: stream-learner.example-batch/1`` so readers tell it from a
    one-example record without parsing it (:mod:`stream_learner.events.batch`).
    """

    format: Literal["stream-learner.example-batch"]
    version: Literal[1]
    examples: list[ExampleEvent]


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
