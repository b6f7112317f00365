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

Decoding is total: whatever the bytes, :meth:`Codec.decode` returns an event
or raises :class:`~stream_learner.errors.EventError`, never anything else, so
no record can stop a role (:mod:`.codec` says how, cheaply).

* :mod:`.wire` — the structs (the contract's fields, types, bounds) and :func:`encode`;
* :mod:`.codec` — :class:`Codec` and the codecs of the roles (:data:`PREDICTION`, ...);
* :mod:`.quotes` — the fast proof that an accepted event holds nothing repeated or unknown;
* :mod:`.scan` — the precise checks where that proof fails: nesting depth, keys given twice;
* :mod:`.explain` — a refusal explained, naming the field at fault.

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

from .codec import DEFAULT_MAX_EVENT_BYTES, DRIFT, EXAMPLE, LABEL, MANIFEST, MAX_DEPTH, PREDICTION, REGISTRY, Codec
from .scan import nesting_exceeds
from .wire import (
    MAX_CLASSES,
    MAX_FEATURES,
    MAX_TEXT_CHARS,
    MAX_VECTOR,
    REGISTRY_HISTORY_MAX,
    CheckpointManifest,
    ClassProbs,
    Count,
    DriftEvent,
    DriftKind,
    EventTime,
    ExampleBatch,
    ExampleEvent,
    ExampleKind,
    Features,
    FeatureValue,
    Finite,
    Ident,
    Label,
    LabelEvent,
    Name,
    Offset,
    Prediction,
    PredictionEvent,
    Probability,
    RegistryRecord,
    Signature,
    Source,
    Text,
    VariantInfo,
    Vector,
    Version,
    VersionNumber,
    WeightsInfo,
    WeightsLayout,
    class_name,
    encode,
    new_event_id,
    now_ms,
)

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "DRIFT",
    "EXAMPLE",
    "LABEL",
    "MANIFEST",
    "MAX_CLASSES",
    "MAX_DEPTH",
    "MAX_FEATURES",
    "MAX_TEXT_CHARS",
    "MAX_VECTOR",
    "PREDICTION",
    "REGISTRY",
    "REGISTRY_HISTORY_MAX",
    "CheckpointManifest",
    "ClassProbs",
    "Codec",
    "Count",
    "DriftEvent",
    "DriftKind",
    "EventTime",
    "ExampleBatch",
    "ExampleEvent",
    "ExampleKind",
    "FeatureValue",
    "Features",
    "Finite",
    "Ident",
    "Label",
    "LabelEvent",
    "Name",
    "Offset",
    "Prediction",
    "PredictionEvent",
    "Probability",
    "RegistryRecord",
    "Signature",
    "Source",
    "Text",
    "VariantInfo",
    "Vector",
    "Version",
    "VersionNumber",
    "WeightsInfo",
    "WeightsLayout",
    "class_name",
    "encode",
    "nesting_exceeds",
    "new_event_id",
    "now_ms",
]
