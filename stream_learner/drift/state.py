"""Detector state: the format version, its errors, and the restricted serializer."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from river import drift as river_drift
from river import stats as river_stats

from ..errors import StreamLearnerError
from .adwin import ADWIN

#: Version of the state layout written by :meth:`Detector.state` and :meth:`DriftMonitor.state`.
STATE_FORMAT = 1


class DriftStateError(StreamLearnerError):
    """Detector state cannot be saved or restored: malformed, or not allowlisted."""


class IncompatibleStateError(DriftStateError):
    """Saved detector state belongs to another detector kind, signal or parameters."""



@dataclasses.dataclass(frozen=True)
class _Allowed:
    cls: type
    params: tuple[str, ...]  # constructor arguments, stored under their own names (River style)
    derived: frozenset[str] = frozenset()  # attributes _reset() rebuilds from the params


_ALLOWED: dict[str, _Allowed] = {
    "stream_learner.drift.ADWIN": _Allowed(
        ADWIN, ("delta", "clock", "max_buckets", "min_window_length", "grace_period")
    ),
    # _test_drift is a bound method chosen from ``mode``; the constructor rebuilds it.
    "river.drift.PageHinkley": _Allowed(
        river_drift.PageHinkley, ("min_instances", "delta", "threshold", "alpha", "mode"), frozenset({"_test_drift"})
    ),
    "river.stats.Mean": _Allowed(river_stats.Mean, ()),
}
_TAG_OF: dict[type, str] = {spec.cls: tag for tag, spec in _ALLOWED.items()}

#: The only classes :func:`from_jsonable` instantiates (besides ``random.Random``), by tag.
ALLOWED_CLASSES: Mapping[str, type] = MappingProxyType({tag: spec.cls for tag, spec in _ALLOWED.items()})

_NDARRAY_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"}
)
_MAX_DEPTH = 32
_SCALARS = (type(None), bool, int, float, str)


def to_jsonable(obj: Any) -> Any:
    """Encode ``obj`` as JSON-able data with type tags, refusing anything not allowlisted.

    Numbers, strings, ``None`` and lists stay as they are; tuples, deques,
    dicts, non-finite floats, numeric numpy arrays and ``random.Random`` get a
    ``"$..."`` tag; an object is encoded (its constructor parameters and
    ``__dict__``) only if its exact class is in :data:`ALLOWED_CLASSES`.
    The result passes ``json.dumps(..., allow_nan=False)``.

    >>> from collections import deque
    >>> to_jsonable({"w": deque([1.0, float("inf")], maxlen=3)})
    {'$dict': [['w', {'$deque': [1.0, {'$float': 'inf'}], 'maxlen': 3}]]}
    """
    return _encode(obj, 0)


def _encode(obj: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise DriftStateError("state is nested too deeply")
    t = type(obj)
    if obj is None or t is bool or t is str or t is int:
        return obj
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else {"$float": repr(f)}
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if t is list:
        return [_encode(v, depth + 1) for v in obj]
    if t is tuple:
        return {"$tuple": [_encode(v, depth + 1) for v in obj]}
    if t is deque:
        return {"$deque": [_encode(v, depth + 1) for v in obj], "maxlen": obj.maxlen}
    if t is dict:
        return {"$dict": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in obj.items()]}
    if t is np.ndarray:
        if obj.dtype.name not in _NDARRAY_DTYPES:
            raise DriftStateError(f"cannot serialize a numpy array of dtype {obj.dtype.name}")
        return {"$ndarray": [_encode(v, depth + 1) for v in obj.ravel().tolist()],
                "dtype": obj.dtype.name, "shape": list(obj.shape)}
    if t is random.Random:
        version, internal, gauss_next = obj.getstate()
        return {"$random": [version, list(internal), gauss_next]}
    tag = _TAG_OF.get(t)
    if tag is None:
        raise DriftStateError(
            f"cannot serialize {t.__module__}.{t.__qualname__}: not in the allowlist of detector classes"
        )
    spec = _ALLOWED[tag]
    fields = vars(obj)
    return {
        "$obj": tag,
        "params": {p: _encode(getattr(obj, p), depth + 1) for p in spec.params},
        "attrs": {k: _encode(v, depth + 1) for k, v in fields.items()
                  if k not in spec.params and k not in spec.derived},
    }


def from_jsonable(data: Any, *, expect: type | None = None) -> Any:
    """Decode :func:`to_jsonable` output; only allowlisted classes are ever instantiated.

    An object is rebuilt by calling its class with the saved constructor
    parameters (plain scalars only), which runs River's ``_reset()``, then
    setting the saved attributes; the saved attribute names must be exactly
    those a fresh instance has, so state from another version of a class is
    refused rather than half-applied. ``expect`` requires the top-level
    object's class. Raises :class:`DriftStateError`.
    """
    obj = _decode(data, 0)
    if expect is not None and type(obj) is not expect:
        raise DriftStateError(f"expected saved {expect.__qualname__}, got {type(obj).__qualname__}")
    return obj


def _decode(data: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise DriftStateError("state is nested too deeply")
    t = type(data)
    if data is None or t in (bool, int, float, str):
        return data
    if t is list:
        return [_decode(v, depth + 1) for v in data]
    if t is not dict:
        raise DriftStateError(f"unexpected {t.__name__} in saved state")
    keys = frozenset(data)
    try:
        if keys == {"$float"} and data["$float"] in ("inf", "-inf", "nan"):
            return float(data["$float"])
        if keys == {"$tuple"}:
            return tuple(_decode_list(data["$tuple"], depth))
        if keys == {"$deque", "maxlen"}:
            maxlen = data["maxlen"]
            if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
                raise DriftStateError(f"bad deque maxlen {maxlen!r}")
            return deque(_decode_list(data["$deque"], depth), maxlen=maxlen)
        if keys == {"$dict"}:
            items = _decode_list(data["$dict"], depth)
            if not all(type(kv) is list and len(kv) == 2 for kv in items):
                raise DriftStateError("a $dict holds [key, value] pairs")
            return {k: v for k, v in items}
        if keys == {"$ndarray", "dtype", "shape"}:
            return _decode_ndarray(data, depth)
        if keys == {"$random"}:
            version, internal, gauss_next = data["$random"]
            if gauss_next is not None and type(gauss_next) is not float:
                raise DriftStateError("bad random state")
            rng = random.Random()
            rng.setstate((version, tuple(internal), gauss_next))  # validates length and types itself
            return rng
        if keys == {"$obj", "params", "attrs"}:
            return _decode_object(data, depth)
    except DriftStateError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise DriftStateError(f"malformed saved state: {exc}") from None
    raise DriftStateError(f"unknown entry in saved state with keys {sorted(keys)}")


def _decode_list(value: Any, depth: int) -> list[Any]:
    if type(value) is not list:
        raise DriftStateError("expected a list in saved state")
    return [_decode(v, depth + 1) for v in value]


def _decode_ndarray(data: dict[str, Any], depth: int) -> np.ndarray:
    dtype, shape = data["dtype"], data["shape"]
    if dtype not in _NDARRAY_DTYPES:
        raise DriftStateError(f"numpy dtype {dtype!r} is not allowed")
    if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
        raise DriftStateError(f"bad numpy shape {shape!r}")
    values = _decode_list(data["$ndarray"], depth)
    if not all(type(v) in (bool, int, float) for v in values) or len(values) != math.prod(shape):
        raise DriftStateError("numpy data does not match its shape")
    return np.array(values, dtype=dtype).reshape(shape)


def _decode_object(data: dict[str, Any], depth: int) -> Any:
    tag, params, attrs = data["$obj"], data["params"], data["attrs"]
    spec = _ALLOWED.get(tag) if type(tag) is str else None
    if spec is None:
        raise DriftStateError(f"class {tag!r} is not in the allowlist of detector classes")
    if type(params) is not dict or type(attrs) is not dict:
        raise DriftStateError(f"{tag}: params and attrs must be objects")
    if set(params) != set(spec.params):
        raise DriftStateError(f"{tag}: saved parameters {sorted(params)} != {sorted(spec.params)}")
    kwargs = {name: _decode(value, depth + 1) for name, value in params.items()}
    # Constructor arguments are scalars only: no saved object ever reaches a constructor.
    if not all(type(v) in _SCALARS for v in kwargs.values()):
        raise DriftStateError(f"{tag}: constructor parameters must be numbers, strings, booleans or null")
    try:
        obj = spec.cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise DriftStateError(f"{tag}: invalid saved parameters: {exc}") from None
    expected = set(vars(obj)) - set(spec.params) - spec.derived
    if set(attrs) != expected:
        raise DriftStateError(
            f"{tag}: saved attributes differ from this version's "
            f"(missing {sorted(expected - set(attrs))}, unknown {sorted(set(attrs) - expected)})"
        )
    for name, value in attrs.items():
        setattr(obj, name, _decode(value, depth + 1))
    return obj

