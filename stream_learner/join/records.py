"""What the join state stores in Redis and what its replies carry.

Events are stored as they will be emitted: :func:`pack_prediction` and
:func:`pack_label` pack what an example needs of the decoded event (the
features and the prediction already encoded as the example's JSON) and its
source with msgpack; the script copies these bytes into its emissions
without looking inside, and the reply carries one msgpack array per outbox
entry, which :func:`decode_emissions` turns into :class:`Emission` values in
one C call (no float is decoded again).

``join.lua`` reads these structs' leading fields at fixed offsets (see
:class:`StoredPrediction`); :mod:`stream_learner.join.store` sends and
receives them.
"""

from __future__ import annotations

import struct

import msgspec
import structlog

from ..events import ExampleKind, LabelEvent, PredictionEvent, Source

log = structlog.get_logger(__name__)


class StoredPrediction(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A prediction as the join state keeps it, and as an emission returns it.

    ``state`` and ``time`` lead, at fixed offsets, for ``join.lua``: the
    state letter of the request (``w`` when packed; the script changes it in
    place) and the event time (a msgpack float64). ``features`` and
    ``prediction`` are kept as the JSON the example carries them in, encoded
    once from the decoded event, so emitting an example decodes no floats.
    """

    state: str
    time: float
    event_id: str
    request_id: str
    model: str
    model_version: str
    features: bytes
    prediction: bytes
    source: Source | None

    @property
    def event_time(self) -> int:
        return int(self.time)


class StoredLabel(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A label as the join state keeps it (state ``e``), like :class:`StoredPrediction`."""

    state: str
    time: float
    event_id: str
    label: str | float
    source: Source | None

    @property
    def event_time(self) -> int:
        return int(self.time)


class Emission(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One example to emit: its kind and the stored events it is built from."""

    kind: ExampleKind
    prediction: StoredPrediction
    label: StoredLabel | None

    @property
    def request_id(self) -> str:
        return self.prediction.request_id


_pack = msgspec.msgpack.Encoder().encode
_json = msgspec.json.Encoder().encode
_emissions = msgspec.msgpack.Decoder(list[Emission])
_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])
_one_emission = msgspec.msgpack.Decoder(Emission)


_str32_header = struct.Struct(">BI").pack


def _lua_string(data: bytes) -> msgspec.Raw:
    """``data`` as a msgpack str: Redis's ``cmsgpack`` does not read msgpack's bin type."""
    return msgspec.Raw(_str32_header(0xDB, len(data)) + data)


def pack_prediction(event: PredictionEvent, source: Source | None) -> msgspec.Raw:
    """What the join state stores for a prediction, framed for ``RedisJoinStore.send``."""
    return _lua_string(
        _pack(
            StoredPrediction(
                "w",
                float(event.event_time),
                event.event_id,
                event.request_id,
                event.model,
                event.model_version,
                _json(event.features),
                _json(event.prediction),
                source,
            )
        )
    )


def pack_label(event: LabelEvent, source: Source | None) -> msgspec.Raw:
    """What the join state stores for a label, framed for ``RedisJoinStore.send``."""
    return _lua_string(_pack(StoredLabel("e", float(event.event_time), event.event_id, event.label, source)))


def decode_emissions(blob: bytes) -> list[Emission]:
    """The emissions of one outbox entry (one msgpack array).

    An emission that does not decode (only a schema change between the
    joiner that stored an event and this one can cause it) is logged and
    skipped; the others are returned.
    """
    try:
        return _emissions.decode(blob)
    except msgspec.DecodeError:
        pass
    out = []
    for raw in _raw_list.decode(blob):
        try:
            out.append(_one_emission.decode(raw))
        except msgspec.DecodeError as exc:
            log.error("joiner_stored_payload_invalid", error=str(exc))
    return out
