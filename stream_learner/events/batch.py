"""Example batches: many joined examples in one record of the examples topic (schema ``example-batch.v1``).

With ``examples_format = "batch"`` the joiner writes, per cycle and
examples-topic partition, records whose value is

.. code-block:: json

    {"format": "stream-learner.example-batch", "version": 1, "examples": [<example.v2>, ...]}

and whose header ``sl-format`` is ``stream-learner.example-batch/1``
(:data:`BATCH_HEADER`). Each element of ``examples`` is byte for byte the
value a one-example record would hold (the joiner joins the encoded examples,
it never re-encodes them), so example ids, kinds and lineage are those of the
JSON format. A record without the header is a one-example record
(``example.v2``), as before; every reader takes both (:func:`record_values`),
whatever the joiner's setting, so a topic written partly in each reads right.

Splitting a batch into its examples parses the record once and keeps each
example as its raw bytes (:func:`batch_values`): a batch that does not parse,
or names another layout, is refused whole (:class:`~stream_learner.errors.EventError`,
kind ``bad_batch``); a well-formed batch holding one bad example yields it
like the others, for the reader's example decoder to refuse alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from ..errors import EventError
from .codec import EXAMPLE
from .wire import EXAMPLE_BATCH_FORMAT, ExampleEvent

#: The record header that names a record's layout, and its value for an example batch of version 1.
H_FORMAT = "sl-format"
BATCH_VERSION = 1
BATCH_HEADER_VALUE = f"{EXAMPLE_BATCH_FORMAT}/{BATCH_VERSION}".encode()
#: The headers of every example-batch record.
BATCH_HEADERS: list[tuple[str, bytes]] = [(H_FORMAT, BATCH_HEADER_VALUE)]

#: What a batch's value starts and ends with around its comma-separated examples.
_PREFIX = f'{{"format":"{EXAMPLE_BATCH_FORMAT}","version":{BATCH_VERSION},"examples":['.encode()
_SUFFIX = b"]}"
#: The bytes a batch's value takes beyond its examples and their commas.
BATCH_OVERHEAD = len(_PREFIX) + len(_SUFFIX)

#: A batch record's target size: records this large already amortise the per-record cost (the
#: producer's per-send work, the broker's per-record framing), and staying well under 1 MiB keeps a
#: batch under a broker's default ``message.max.bytes`` even where the topic was not created by us.
BATCH_TARGET_BYTES = 512 * 1024


class _Batch(msgspec.Struct, frozen=True):
    """A batch as read: its examples left as raw JSON (each decoded, and refused, on its own)."""

    format: str
    version: int
    examples: list[msgspec.Raw]


_batch = msgspec.json.Decoder(_Batch)


def encode_batch(values: Sequence[bytes]) -> bytes:
    """The value of one batch record holding the already-encoded examples ``values``, in order.

    >>> encode_batch([b'{"a":1}', b'{"b":2}'])
    b'{"format":"stream-learner.example-batch","version":1,"examples":[{"a":1},{"b":2}]}'
    """
    return _PREFIX + b",".join(values) + _SUFFIX


def split_batches(values: Sequence[bytes], max_bytes: int) -> list[bytes]:
    """``values`` as the values of as few batch records as fit, each at most ``max_bytes``, in order.

    An example too large to share a record goes alone (a batch of one is as
    large as its JSON record, plus :data:`BATCH_OVERHEAD`).

    >>> [len(v) for v in split_batches([b"x" * 10] * 5, BATCH_OVERHEAD + 32)]
    [99, 88]
    """
    out: list[bytes] = []
    start, size = 0, BATCH_OVERHEAD
    for i, value in enumerate(values):
        grown = size + len(value) + (i > start)  # a comma before every example but the first
        if i > start and grown > max_bytes:
            out.append(encode_batch(values[start:i]))
            start, grown = i, BATCH_OVERHEAD + len(value)
        size = grown
    if start < len(values):
        out.append(encode_batch(values[start:]))
    return out


def header(headers: Iterable[tuple[str, bytes]] | None) -> bytes | None:
    """The ``sl-format`` header's value, or ``None`` (a one-example record has none)."""
    for key, value in headers or ():
        if key == H_FORMAT:
            return bytes(value)
    return None


def is_batch(headers: Iterable[tuple[str, bytes]] | None) -> bool:
    """Whether a record with these headers claims to be an example batch (any version: a newer one
    is refused by :func:`batch_values`, not mistaken for one example)."""
    found = header(headers)
    return found is not None and found.startswith(EXAMPLE_BATCH_FORMAT.encode() + b"/")


def batch_values(value: bytes | None) -> list[bytes]:
    """The raw examples of a batch record's value, in order; :class:`EventError` (``bad_batch``) if
    the value is no batch this version reads.

    >>> batch_values(encode_batch([b'{"a":1}', b'{"b" : 2}']))
    [b'{"a":1}', b'{"b" : 2}']
    >>> batch_values(b'{"format":"stream-learner.example-batch","version":1,"examples":[{"a":')
    Traceback (most recent call last):
    ...
    stream_learner.errors.EventError: $: example batch does not parse: Input data was truncated
    """
    if value is None:
        raise EventError("bad_batch", "$", "example batch has no value (tombstone)")
    try:
        batch = _batch.decode(value)
    except msgspec.ValidationError as exc:
        raise EventError("bad_batch", "$", f"not an example batch: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EventError("bad_batch", "$", f"example batch does not parse: {exc}") from None
    except RecursionError:
        raise EventError("bad_batch", "$", "example batch nests too deep to parse") from None
    if batch.format != EXAMPLE_BATCH_FORMAT:
        raise EventError("bad_batch", "$.format", f"format {batch.format!r} is not {EXAMPLE_BATCH_FORMAT!r}")
    if batch.version != BATCH_VERSION:
        raise EventError(
            "bad_batch", "$.version", f"example batch version {batch.version} (this reader reads {BATCH_VERSION})"
        )
    return [bytes(raw) for raw in batch.examples]


def record_values(record: Any) -> list[bytes]:
    """The example values a record of the examples topic holds: its value, or a batch's examples.

    Raises :class:`EventError` for a batch that does not parse (see :func:`batch_values`).
    """
    if record.headers and is_batch(record.headers):
        return batch_values(record.value)
    return [record.value]


def record_examples(record: Any) -> list[ExampleEvent]:
    """The examples a record of the examples topic holds, decoded (either format).

    Raises :class:`EventError` if the record, or one example of a batch, is refused; a reader that
    wants the others of a batch decodes :func:`record_values` one by one.
    """
    return [EXAMPLE.decode(value) for value in record_values(record)]
