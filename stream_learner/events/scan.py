"""The precise checks of an event msgspec accepted: its nesting depth, then keys given twice.

They run only when the fast proof (:mod:`.quotes`) fails, or for event types
it does not cover; a refusal is ``too_deep`` or ``duplicate_key``.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import EventError

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


def too_deep(limit: int) -> EventError:
    """The refusal of an event nesting deeper than ``limit`` levels."""
    return EventError("too_deep", "$", f"arrays and objects nest deeper than {limit} levels")


def scan(data: bytes | bytearray, max_depth: int, fields: frozenset[str]) -> None:
    """Refuse ``data`` (an event msgspec accepted, with top-level ``fields``) if it nests deeper
    than ``max_depth`` levels or gives a key twice where the reader looks (:class:`EventError`)."""
    if nesting_exceeds(data, max_depth):
        raise too_deep(max_depth)
    try:
        # Numbers are not needed: len() keeps huge integers from Python's 4,300-digit limit.
        doc = json.loads(data, object_pairs_hook=_Object, parse_int=len, parse_float=len, parse_constant=len)
    except Exception as exc:  # noqa: BLE001 - msgspec accepted it; say why Python's json did not
        raise EventError("malformed_json", "$", f"not valid JSON to a strict reader: {exc}") from None
    if type(doc) is _Object:
        field = _repeated(doc, fields)
        if field is not None:
            raise EventError(
                "duplicate_key", field, "the key is given more than once (which value is meant is ambiguous)"
            )
