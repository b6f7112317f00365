"""Decoding: :class:`Codec`, one per event type, and the codecs the roles use.

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
count of its quote characters (:mod:`.quotes`) proves that the bytes hold exactly the strings
the decoded event holds (no key twice, no unknown field, so nothing nested
deeper than the event's own shape). Only an event that fails that count (it
has unknown fields, escaped quotes or ``null`` for an optional field) is
scanned precisely (:mod:`.scan`): its nesting depth, then its keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
from msgspec import Struct

from ..errors import EventError
from .explain import explain_malformed, explain_validation
from .quotes import QUOTE_COUNTS, STRING_VALUES
from .scan import nesting_exceeds, scan, too_deep
from .wire import CheckpointManifest, DriftEvent, ExampleEvent, LabelEvent, PredictionEvent, RegistryRecord

#: The deepest nesting of arrays and objects an event may have (the event's own object is level 1;
#: a prediction's class probabilities are level 2, as are an example's sources).
MAX_DEPTH = 64
#: Default limit on an encoded event's size; larger messages are refused
#: before decoding so a huge payload cannot exhaust memory.
DEFAULT_MAX_EVENT_BYTES = 1 << 20

E = TypeVar("E", bound=Struct)


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
    proof (:mod:`.quotes`). Other types (manifests, drift events, a
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
        self._quotes = QUOTE_COUNTS.get(event_type)
        self._strings = STRING_VALUES.get(event_type)
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
            raise self._refusal(bytes(data), explain_validation, str(exc), "invalid_value") from None
        except msgspec.DecodeError as exc:
            raise self._refusal(bytes(data), explain_malformed, str(exc), "malformed_json") from None
        except RecursionError:
            raise too_deep(self.max_depth) from None
        except Exception as exc:  # noqa: BLE001 - no record may stop a role
            raise _undecodable(exc) from None
        # The fast proof (:mod:`.quotes`); anything it does not prove is scanned (:mod:`.scan`).
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
                scan(raw, self.max_depth, self._fields)
        return event

    def convert(self, obj: dict[str, Any]) -> E:
        """Validate Python values (as an SDK caller passes them) into an event."""
        try:
            return msgspec.convert(obj, self.event_type)
        except msgspec.ValidationError as exc:
            msg = str(exc)
        except RecursionError:
            raise too_deep(self.max_depth) from None
        except Exception as exc:  # noqa: BLE001 - the caller gets an EventError, whatever it passed
            raise _undecodable(exc) from None
        try:
            # json.dumps writes NaN/Infinity tokens, which the key resolver reads back.
            as_json = json.dumps(obj, default=repr).encode()
        except Exception:  # noqa: BLE001 - nested too deep, or a cycle: explain without it
            as_json = b"null"
        raise self._refusal(as_json, explain_validation, msg, "invalid_value") from None

    def _refusal(
        self, data: bytes | bytearray, explain: Callable[[str, bytes | bytearray], EventError], msg: str, kind: str
    ) -> EventError:
        """Why ``data`` was refused: ``too_deep`` first (explaining parses it again), else what
        ``explain`` makes of msgspec's message; never an exception of its own."""
        if nesting_exceeds(data, self.max_depth):
            return too_deep(self.max_depth)
        try:
            return explain(msg, data)
        except Exception:  # noqa: BLE001 - msgspec's own words are still a reason
            return EventError(kind, "$", msg)


def _undecodable(exc: BaseException) -> EventError:
    """The refusal of bytes the decoder failed on in a way nobody foresaw, naming the exception."""
    return EventError("undecodable", "$", f"the decoder failed: {type(exc).__name__}: {exc}"[:1000])


PREDICTION: Codec[PredictionEvent] = Codec(PredictionEvent)
LABEL: Codec[LabelEvent] = Codec(LabelEvent)
EXAMPLE: Codec[ExampleEvent] = Codec(ExampleEvent)
MANIFEST: Codec[CheckpointManifest] = Codec(CheckpointManifest)
DRIFT: Codec[DriftEvent] = Codec(DriftEvent)
#: Registry records are small: one larger than this is refused unread.
REGISTRY: Codec[RegistryRecord] = Codec(RegistryRecord, 64 * 1024)
