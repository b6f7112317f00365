"""Why msgspec refused an event, as an :class:`~stream_learner.errors.EventError` naming the field.

This path may be slow: it runs only for refused events, and turns msgspec's
terse message into one that names the field and a ``kind`` (msgspec writes
dict keys as ``[...]``: the key at fault is found in the bytes).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import EventError
from .wire import FINITE_MAX

_AT = re.compile(r" - at `(\$[^`]*)`$")
_AT_KEY = re.compile(r" - at `key` in `(\$[^`]*)`$")
_BOUND = re.compile(r"^Expected `\w+` (<=|>=|<|>) (\S+)$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`")
_GOT = re.compile(r"^Expected `[^`]+`, got `(\w+)`")
_JSON_TYPES = {"str": str, "bool": bool, "null": type(None), "int": int, "float": float, "array": list, "object": dict}


def explain_validation(msg: str, data: bytes | bytearray | memoryview) -> EventError:
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
    return isinstance(value, float) and (not math.isfinite(value) or abs(value) > FINITE_MAX)


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


def explain_malformed(msg: str, data: bytes | bytearray | memoryview) -> EventError:
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
